// Router worker registry: registration, heartbeats, incarnations, eviction, fingerprint refusal
// and static worker polling, against fake workers over real loopback gRPC.
#include <gtest/gtest.h>

#include "proto/convert.h"
#include "tests/router/router_harness.h"

namespace tandem::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

const TokenScript kScript{{5, 17, 33, 99, 250, 7, 512, 1000, 3, 64}};

RouterOptions Options(std::chrono::milliseconds interval, int missed = 3) {
  RouterOptions o;
  o.model_dir = FixtureModelDir();
  o.heartbeat_interval = interval;
  o.missed_heartbeats = missed;
  return o;
}

bool HasWorker(const std::vector<WorkerView>& views, const std::string& name, uint64_t inc) {
  for (const auto& v : views) {
    if (v.info.name() == name && v.info.incarnation_id() == inc) return true;
  }
  return false;
}

TEST(RouterRegistryTest, RegisterHeartbeatAndIncarnations) {
  const uint64_t fp = FingerprintOf(FixtureModelDir());
  RouterHarness h(Options(seconds(30)));
  SignalBoard board;
  FakeWorker d1(internal::v1::ROLE_DECODE, "d1", fp, kScript, &board);
  d1.set_incarnation(11);

  internal::v1::RegisterResponse resp;
  ASSERT_TRUE(h.Register(d1.info(), &resp).ok());
  EXPECT_EQ(resp.heartbeat_interval_ms(), 30000);
  ASSERT_EQ(h.router().Workers().size(), 1u);
  EXPECT_TRUE(h.router().Workers()[0].up);
  EXPECT_FALSE(h.router().Workers()[0].is_static);

  // Heartbeats update load and draining.
  EXPECT_TRUE(h.Heartbeat("d1", 11, DecodeLoad(123, 4), /*draining=*/true));
  auto views = h.router().Workers();
  ASSERT_EQ(views.size(), 1u);
  EXPECT_EQ(views[0].load.free_kv_blocks(), 123);
  EXPECT_EQ(views[0].load.running_sequences(), 4);
  EXPECT_TRUE(views[0].draining);

  // Unknown names and incarnations are told to register again.
  EXPECT_FALSE(h.Heartbeat("d1", 12, DecodeLoad(1)));
  EXPECT_FALSE(h.Heartbeat("nobody", 11, DecodeLoad(1)));

  // A restart (new incarnation under the same name) replaces the old worker entirely.
  d1.set_incarnation(12);
  ASSERT_TRUE(h.Register(d1.info()).ok());
  views = h.router().Workers();
  ASSERT_EQ(views.size(), 1u);
  EXPECT_EQ(views[0].info.incarnation_id(), 12u);
  EXPECT_FALSE(views[0].draining);  // the old incarnation's state is gone
  EXPECT_EQ(views[0].load.free_kv_blocks(), 0);
  EXPECT_FALSE(h.Heartbeat("d1", 11, DecodeLoad(1)));
  EXPECT_TRUE(h.Heartbeat("d1", 12, DecodeLoad(1)));

  // The same incarnation registering again (a lost response) is idempotent.
  ASSERT_TRUE(h.Register(d1.info()).ok());
  EXPECT_EQ(h.router().Workers().size(), 1u);
}

TEST(RouterRegistryTest, RefusesFingerprintMismatchAndMalformedInfo) {
  const uint64_t fp = FingerprintOf(FixtureModelDir());
  RouterHarness h(Options(seconds(30)));
  SignalBoard board;
  FakeWorker other(internal::v1::ROLE_DECODE, "w-other", fp ^ 0x5a5a, kScript, &board);

  grpc::Status s = h.Register(other.info());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(s.error_message(), "model fingerprint mismatch: worker w-other serves " +
                                   FingerprintHex(fp ^ 0x5a5a) + ", router " + FingerprintHex(fp));

  WorkerInfo bad = other.info();
  bad.set_model_fingerprint(fp);
  bad.set_role(internal::v1::ROLE_UNSPECIFIED);
  s = h.Register(bad);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message().rfind("info.role", 0), 0u) << s.error_message();

  bad = other.info();
  bad.set_model_fingerprint(fp);
  bad.clear_grpc_address();
  s = h.Register(bad);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(h.router().Workers().empty());
}

TEST(RouterRegistryTest, EvictsWorkersThatMissHeartbeats) {
  const uint64_t fp = FingerprintOf(FixtureModelDir());
  // Evicted after 3 missed intervals of 100 ms; the live worker beats every 20 ms, which leaves
  // a wide margin on a loaded machine.
  RouterHarness h(Options(milliseconds(100), /*missed=*/3));
  SignalBoard board;
  FakeWorker quiet(internal::v1::ROLE_DECODE, "quiet", fp, kScript, &board);
  FakeWorker alive(internal::v1::ROLE_PREFILL, "alive", fp, kScript, &board);
  h.Add(quiet);
  h.Add(alive);
  HeartbeatPump pump(&h, &alive, PrefillLoad(0), milliseconds(20));

  const uint64_t quiet_inc = quiet.info().incarnation_id();
  ASSERT_TRUE(h.router().AwaitWorkers(
      [&](const std::vector<WorkerView>& v) { return !HasWorker(v, "quiet", quiet_inc); },
      seconds(10)));
  EXPECT_TRUE(HasWorker(h.router().Workers(), "alive", alive.info().incarnation_id()));
  // An evicted worker is unknown: its next heartbeat makes it register again.
  EXPECT_FALSE(h.Heartbeat(quiet, DecodeLoad(1)));
}

TEST(RouterRegistryTest, PollsStaticWorkers) {
  const uint64_t fp = FingerprintOf(FixtureModelDir());
  SignalBoard board;
  FakeWorker d(internal::v1::ROLE_DECODE, "static-d", fp, kScript, &board);
  FakeWorker wrong(internal::v1::ROLE_DECODE, "static-wrong", fp ^ 1, kScript, &board);
  d.set_load(DecodeLoad(77));
  RouterOptions o = Options(milliseconds(30));
  o.static_workers = {{d.address(), internal::v1::ROLE_DECODE},
                      {wrong.address(), internal::v1::ROLE_DECODE}};
  RouterHarness h(o);

  auto state = [&](const std::string& address, bool up) {
    return [address, up](const std::vector<WorkerView>& v) {
      for (const auto& w : v) {
        if (w.info.grpc_address() == address) return w.is_static && w.up == up;
      }
      return false;
    };
  };
  ASSERT_TRUE(h.router().AwaitWorkers(state(d.address(), true), seconds(10)));
  for (const auto& w : h.router().Workers()) {
    if (w.info.grpc_address() == d.address()) {
      EXPECT_EQ(w.load.free_kv_blocks(), 77);
      EXPECT_EQ(w.info.name(), "static-d");
    }
  }
  // A worker serving another model is polled but never up.
  ASSERT_TRUE(wrong.WaitFor([](const FakeStats& s) { return s.get_info >= 2; }));
  EXPECT_TRUE(state(wrong.address(), false)(h.router().Workers()));

  // It serves requests.
  const std::vector<int32_t> prompt = {1, 2, 3};
  GenerateResult r = h.Generate(IdsRequest(prompt, 4));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids, kScript.Expected(prompt, 4));
  EXPECT_EQ(d.stats().calls, 1);

  // A failed poll marks it down; a successful one brings it back.
  d.set_get_info_fails(true);
  ASSERT_TRUE(h.router().AwaitWorkers(state(d.address(), false), seconds(10)));
  r = h.Generate(IdsRequest(prompt, 4));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(r.status.error_message(), "no decode worker available");
  d.set_get_info_fails(false);
  ASSERT_TRUE(h.router().AwaitWorkers(state(d.address(), true), seconds(10)));
}

}  // namespace
}  // namespace tandem::testing
