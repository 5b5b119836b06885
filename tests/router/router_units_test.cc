// Router building blocks without a server: admission queue, prefix affinity, worker choice,
// request preparation.
#include <gtest/gtest.h>

#include "router/internal/admission.h"
#include "router/internal/prefix_affinity.h"
#include "router/internal/prepare.h"
#include "router/internal/worker_pool.h"
#include "tests/router/router_harness.h"

namespace tandem::testing {
namespace {

struct RecordingWaiter : AdmissionQueue::Waiter {
  void Admitted() override { ++admitted; }
  int admitted = 0;
};

TEST(AdmissionQueueTest, AdmitsQueuesInOrderAndRejects) {
  AdmissionQueue q(/*max_running=*/2, /*max_queued=*/2);
  RecordingWaiter w[6];
  EXPECT_EQ(q.Enter(&w[0]), AdmissionQueue::Entry::kAdmitted);
  EXPECT_EQ(q.Enter(&w[1]), AdmissionQueue::Entry::kAdmitted);
  EXPECT_EQ(q.Enter(&w[2]), AdmissionQueue::Entry::kQueued);
  EXPECT_EQ(q.Enter(&w[3]), AdmissionQueue::Entry::kQueued);
  EXPECT_EQ(q.Enter(&w[4]), AdmissionQueue::Entry::kRejected);
  EXPECT_EQ(q.running(), 2);
  EXPECT_EQ(q.queued(), 2);

  q.Release();  // the oldest waiter takes the slot
  EXPECT_EQ(w[2].admitted, 1);
  EXPECT_EQ(w[3].admitted, 0);
  EXPECT_FALSE(q.Remove(&w[2]));  // admitted already
  EXPECT_TRUE(q.Remove(&w[3]));   // e.g. cancelled while waiting
  EXPECT_EQ(q.queued(), 0);
  EXPECT_EQ(q.running(), 2);
  q.Release();
  q.Release();
  EXPECT_EQ(q.running(), 0);
  EXPECT_EQ(w[3].admitted, 0);
  // A newcomer never overtakes a waiter.
  AdmissionQueue one(1, 5);
  EXPECT_EQ(one.Enter(&w[0]), AdmissionQueue::Entry::kAdmitted);
  EXPECT_EQ(one.Enter(&w[5]), AdmissionQueue::Entry::kQueued);
  one.Release();
  EXPECT_EQ(w[5].admitted, 1);
  EXPECT_EQ(one.running(), 1);
}

TEST(PrefixAffinityTest, MatchesLeadingBlocksWithinCapacity) {
  PrefixAffinity a(4);
  const std::vector<BlockHash> p1 = {1, 2, 3};
  a.Record(p1);
  EXPECT_EQ(a.MatchedBlocks(p1), 3u);
  EXPECT_EQ(a.MatchedBlocks(std::vector<BlockHash>{1, 2, 9}), 2u);
  EXPECT_EQ(a.MatchedBlocks(std::vector<BlockHash>{9, 2, 3}), 0u);  // chained: leading only
  a.Record(std::vector<BlockHash>{7, 8});  // over capacity: the oldest (1) leaves
  EXPECT_EQ(a.size(), 4u);
  EXPECT_EQ(a.MatchedBlocks(p1), 0u);
  EXPECT_EQ(a.MatchedBlocks(std::vector<BlockHash>{7, 8}), 2u);
}

struct NullWatcher : WorkerWatcher {
  void Retain() override {}
  void Release() override {}
  void WorkerLost(const std::string& reason) override { lost.push_back(reason); }
  std::vector<std::string> lost;
};

internal::v1::WorkerInfo Info(const std::string& name, internal::v1::Role role, uint64_t fp) {
  internal::v1::WorkerInfo i;
  i.set_name(name);
  i.set_incarnation_id(1);
  i.set_role(role);
  i.set_grpc_address("127.0.0.1:1");  // never dialled here
  i.set_model_fingerprint(fp);
  i.mutable_kv_layout()->set_block_size(16);
  return i;
}

internal::v1::HeartbeatRequest Beat(const std::string& name, internal::v1::WorkerLoad load,
                                    bool draining = false) {
  internal::v1::HeartbeatRequest h;
  h.set_name(name);
  h.set_incarnation_id(1);
  *h.mutable_load() = load;
  h.set_draining(draining);
  return h;
}

TEST(WorkerPoolTest, PicksDecodeByFreeBlocksNetOfInFlightThenBatch) {
  WorkerPoolOptions o;
  o.fingerprint = 42;
  WorkerPool pool(o);
  ASSERT_TRUE(pool.Register(Info("a", internal::v1::ROLE_DECODE, 42)).ok());
  ASSERT_TRUE(pool.Register(Info("b", internal::v1::ROLE_DECODE, 42)).ok());
  ASSERT_TRUE(pool.Register(Info("p", internal::v1::ROLE_PREFILL, 42)).ok());
  ASSERT_TRUE(pool.Heartbeat(Beat("a", DecodeLoad(100, 5))));
  ASSERT_TRUE(pool.Heartbeat(Beat("b", DecodeLoad(90, 1))));
  NullWatcher w[4];

  auto first = pool.PickDecode(/*tokens=*/160, {}, &w[0]);  // 10 blocks
  ASSERT_TRUE(first);
  EXPECT_EQ(first->key, "a");
  EXPECT_EQ(first->blocks, 10);
  // a: 100 - 10 in flight = 90 = b's free blocks; b's batch is smaller.
  auto second = pool.PickDecode(160, {}, &w[1]);
  ASSERT_TRUE(second);
  EXPECT_EQ(second->key, "b");
  // Acknowledged work stays counted until the worker's next load report.
  pool.DecodeAcknowledged(&*first);
  auto third = pool.PickDecode(16, {}, &w[2]);
  EXPECT_EQ(third->key, "a");                                 // a: 90 - 1 = 89 vs b: 80
  ASSERT_TRUE(pool.Heartbeat(Beat("a", DecodeLoad(20, 6))));  // now shows the reservations
  auto fourth = pool.PickDecode(16, {}, &w[3]);
  EXPECT_EQ(fourth->key, "b");
  // `avoid` is a preference; draining workers are never picked.
  pool.DecodeEnded(*fourth, &w[3]);
  fourth = pool.PickDecode(16, {"b"}, &w[3]);
  EXPECT_EQ(fourth->key, "a");
  pool.DecodeEnded(*fourth, &w[3]);
  fourth = pool.PickDecode(16, {"a", "b"}, &w[3]);
  EXPECT_EQ(fourth->key, "b");
  pool.DecodeEnded(*fourth, &w[3]);
  ASSERT_TRUE(pool.Heartbeat(Beat("b", DecodeLoad(90, 1), /*draining=*/true)));
  fourth = pool.PickDecode(16, {"a"}, &w[3]);
  EXPECT_EQ(fourth->key, "a");
  pool.DecodeEnded(*fourth, &w[3]);

  // A restart of "a" tells its calls in flight.
  auto restarted = Info("a", internal::v1::ROLE_DECODE, 42);
  restarted.set_incarnation_id(2);
  ASSERT_TRUE(pool.Register(restarted).ok());
  EXPECT_EQ(w[0].lost.size(), 1u);
  EXPECT_EQ(w[2].lost.size(), 1u);
  EXPECT_TRUE(w[1].lost.empty());
  pool.DecodeEnded(*first, &w[0]);  // of the old incarnation: ignored
}

TEST(WorkerPoolTest, PicksPrefillByQueueMinusPrefixHit) {
  WorkerPoolOptions o;
  o.fingerprint = 42;
  WorkerPool pool(o);
  ASSERT_TRUE(pool.Register(Info("p1", internal::v1::ROLE_PREFILL, 42)).ok());
  ASSERT_TRUE(pool.Register(Info("p2", internal::v1::ROLE_PREFILL, 42)).ok());
  ASSERT_TRUE(pool.Heartbeat(Beat("p1", PrefillLoad(100))));
  ASSERT_TRUE(pool.Heartbeat(Beat("p2", PrefillLoad(50))));
  NullWatcher w;
  std::vector<int32_t> prompt(64);
  for (int i = 0; i < 64; ++i) prompt[i] = i;
  const auto hashes = HashFullBlocks(prompt, kAffinityBlockTokens, 42);
  ASSERT_EQ(hashes.size(), 4u);

  auto first = pool.PickPrefill(hashes, 64, {}, &w);
  ASSERT_TRUE(first);
  EXPECT_EQ(first->key, "p2");
  EXPECT_EQ(first->cached_tokens, 0);
  pool.PrefillEnded(*first, &w);
  // p2 is busier now, but it saw this prompt: 120 - 64 < 100.
  ASSERT_TRUE(pool.Heartbeat(Beat("p2", PrefillLoad(120))));
  auto second = pool.PickPrefill(hashes, 64, {}, &w);
  EXPECT_EQ(second->key, "p2");
  EXPECT_EQ(second->cached_tokens, 64);
  // Its own in-flight prompt tokens count against it: another prompt goes to p1.
  std::vector<int32_t> other(64, 7);
  auto third = pool.PickPrefill(HashFullBlocks(other, kAffinityBlockTokens, 42), 64, {}, &w);
  EXPECT_EQ(third->key, "p1");
  // Failed workers are never retried for the same request.
  EXPECT_FALSE(pool.PickPrefill(hashes, 64, {"p1", "p2"}, &w));
  EXPECT_FALSE(pool.HasPrefill({"p1", "p2"}));
  EXPECT_TRUE(pool.HasPrefill({"p1"}));
}

TEST(PrepareTest, Utf8AndDefaults) {
  EXPECT_EQ(Utf8Error("plain ascii, \xc3\xa9, \xe2\x82\xac, \xf0\x9f\x98\x80"), "");
  EXPECT_NE(Utf8Error("\xc0\x80"), "");          // overlong
  EXPECT_NE(Utf8Error("\xed\xa0\x80"), "");      // surrogate
  EXPECT_NE(Utf8Error("\xf4\x90\x80\x80"), "");  // past U+10FFFF
  EXPECT_NE(Utf8Error("\xe2\x82"), "");          // truncated
  EXPECT_EQ(Utf8Error("ab\xff"), "invalid UTF-8 at byte 2");

  ServedModel m;
  m.name = "m";
  m.config.vocab_size = 100;
  m.config.max_position_embeddings = 20;
  v1::GenerateRequest r = IdsRequest({1, 2, 3}, 4);
  r.mutable_sampling()->clear_max_tokens();
  auto p = PrepareGenerate(r, m);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->max_tokens, 16);
  EXPECT_EQ(p->sampling.max_tokens(), 16);
  EXPECT_EQ(p->logprobs, -1);
  for (int i = 0; i < 10; ++i) r.mutable_token_ids()->add_ids(1);
  p = PrepareGenerate(r, m);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->max_tokens, 7);  // 20 - 13

  // Protobuf (depending on how a message arrives) may refuse invalid UTF-8 in string fields
  // before the router sees them, so these checks are tested here rather than over gRPC.
  v1::GenerateRequest bad_text;
  bad_text.set_text("ok \xff\xfe");
  EXPECT_EQ(PrepareGenerate(bad_text, m).status().message(),
            "prompt.text: invalid UTF-8 at byte 3");
  v1::GenerateRequest bad_stop = IdsRequest({1}, 2);
  bad_stop.mutable_sampling()->add_stop("\xc0\xaf");
  p = PrepareGenerate(bad_stop, m);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(p.status().message(), "stop: invalid UTF-8 at byte 0");
}

}  // namespace
}  // namespace tandem::testing
