// Every way a disaggregated request can end early — cancellation on either side, hostile or
// stale tickets, a transfer that never comes, bad requests, draining and shutdown — ends with
// the documented status and gives every KV block back on both workers.
#include <gtest/gtest.h>

#include <future>
#include <thread>

#include "tests/workers/worker_test_util.h"

namespace tandem {
namespace {

using namespace testing_util;  // NOLINT(build/namespaces)

bool Contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

grpc::Status CallPrefill(Cluster& cluster, const iv1::SequenceSpec& spec,
                         const iv1::LandingTicket* ticket, iv1::PrefillResponse* resp = nullptr) {
  iv1::PrefillRequest req;
  *req.mutable_seq() = spec;
  if (ticket != nullptr) *req.mutable_ticket() = *ticket;
  grpc::ClientContext ctx;
  ctx.set_deadline(In(std::chrono::seconds(60)));
  iv1::PrefillResponse ignored;
  return cluster.prefill_stub().Prefill(&ctx, req, resp != nullptr ? resp : &ignored);
}

ClusterOptions Demo(std::chrono::milliseconds transfer_timeout = std::chrono::seconds(30)) {
  const auto o = Options(DemoModelDir(), 16, DType::kF32);
  return ClusterOptions{o, o, transfer_timeout};
}

TEST(WorkerFailureTest, CancelDecodeWhileWaitingForKv) {
  Cluster cluster(Demo());
  const auto spec = Spec(Prompt(30, 1, VocabSize(Demo().decode)), 8);
  DecodeStream d(cluster, spec);
  ASSERT_TRUE(d.first.has_ticket());
  EXPECT_LT(cluster.decode().free_blocks(), cluster.decode().total_blocks());
  d.ctx.TryCancel();
  EXPECT_EQ(d.Finish().error_code(), grpc::StatusCode::CANCELLED);
  cluster.ExpectIdle();
  // The ticket is dead now: a prefill that still uses it cannot land anything. It may answer
  // OK (its END was queued before the receiver refused the transfer) or UNAVAILABLE.
  const grpc::Status late = CallPrefill(cluster, spec, &d.first.ticket());
  EXPECT_TRUE(late.ok() || late.error_code() == grpc::StatusCode::UNAVAILABLE)
      << late.error_message();
  cluster.ExpectIdle();
}

TEST(WorkerFailureTest, CancelDecodeMidStream) {
  Cluster cluster(Demo());
  const auto spec = Spec(Prompt(8, 2, VocabSize(Demo().decode)), 480);
  DecodeStream d(cluster, spec);
  ASSERT_TRUE(d.first.has_ticket());
  ASSERT_TRUE(CallPrefill(cluster, spec, &d.first.ticket()).ok());
  EXPECT_GE(d.ReadSome(3), 3);
  d.ctx.TryCancel();
  EXPECT_EQ(d.Finish().error_code(), grpc::StatusCode::CANCELLED);
  cluster.ExpectIdle();
}

TEST(WorkerFailureTest, CancelPrefillMidTransfer) {
  ClusterOptions o = Demo();
  o.prefill.max_batch_tokens = 1;  // one prompt token per step: the transfer takes a while
  Cluster cluster(o);
  const int len = 480;
  const auto spec = Spec(Prompt(len, 3, VocabSize(o.decode)), 8);
  DecodeStream d(cluster, spec);
  ASSERT_TRUE(d.first.has_ticket());

  iv1::PrefillRequest req;
  *req.mutable_seq() = spec;
  *req.mutable_ticket() = d.first.ticket();
  grpc::ClientContext pctx;
  iv1::PrefillResponse presp;
  std::promise<grpc::Status> done;
  cluster.prefill_stub().async()->Prefill(&pctx, &req, &presp,
                                          [&](grpc::Status s) { done.set_value(std::move(s)); });
  // Bounded poll until some layers of the prompt went out (the load snapshot shows progress).
  EXPECT_TRUE(Eventually([&] {
    const int64_t queued = cluster.prefill().Load().queued_prefill_tokens();
    return queued > 0 && queued < len;
  }));
  pctx.TryCancel();
  EXPECT_EQ(done.get_future().get().error_code(), grpc::StatusCode::CANCELLED);
  // The ABORT reaches the decode side, which ends its call naming the transfer error.
  const grpc::Status ds = d.Finish();
  EXPECT_EQ(ds.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(Contains(ds.error_message(), "KV transfer failed")) << ds.error_message();
  cluster.ExpectIdle();
}

TEST(WorkerFailureTest, BadTicketsAreRefused) {
  Cluster cluster(Demo());
  const auto spec = Spec(Prompt(10, 4, VocabSize(Demo().decode)), 4);
  DecodeStream d(cluster, spec);
  ASSERT_TRUE(d.first.has_ticket());
  const iv1::LandingTicket& good = d.first.ticket();

  iv1::LandingTicket t = good;
  t.set_model_fingerprint(good.model_fingerprint() ^ 1);
  grpc::Status s = CallPrefill(cluster, spec, &t);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(Contains(s.error_message(), "model fingerprint mismatch")) << s.error_message();

  t = good;
  t.mutable_layout()->set_num_layers(good.layout().num_layers() + 1);
  s = CallPrefill(cluster, spec, &t);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(Contains(s.error_message(), "kv layout")) << s.error_message();

  t = good;
  t.set_token("short");
  s = CallPrefill(cluster, spec, &t);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(Contains(s.error_message(), "ticket.token")) << s.error_message();

  t = good;
  t.set_token_count(good.token_count() + 1);
  s = CallPrefill(cluster, spec, &t);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(Contains(s.error_message(), "ticket.token_count")) << s.error_message();

  s = CallPrefill(cluster, spec, nullptr);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(Contains(s.error_message(), "ticket")) << s.error_message();

  // None of these touched the decode side's reservation; a forged token (right length) reaches
  // the receiver, which refuses the transfer and fails the call.
  t = good;
  std::string forged = good.token();
  forged[0] = static_cast<char>(forged[0] ^ 0x5a);
  t.set_token(forged);
  s = CallPrefill(cluster, spec, &t);
  EXPECT_TRUE(s.ok() || s.error_code() == grpc::StatusCode::UNAVAILABLE) << s.error_message();
  const grpc::Status ds = d.Finish();
  EXPECT_EQ(ds.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(Contains(ds.error_message(), "bad_token")) << ds.error_message();
  cluster.ExpectIdle();
}

TEST(WorkerFailureTest, TransferThatNeverComesEndsUnavailable) {
  Cluster cluster(Demo(std::chrono::milliseconds(200)));
  const auto spec = Spec(Prompt(12, 5, VocabSize(Demo().decode)), 4);
  DecodeStream d(cluster, spec);
  ASSERT_TRUE(d.first.has_ticket());
  const grpc::Status s = d.Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(Contains(s.error_message(), "deadline")) << s.error_message();
  cluster.ExpectIdle();

  // The call's own deadline comes first: the landing's deadline is that same instant, so the
  // client sees DEADLINE_EXCEEDED (gRPC) or UNAVAILABLE (the landing's reaper won the race, on a
  // loaded machine); either way the worker frees everything.
  DecodeStream short_call(cluster, spec, false, std::chrono::milliseconds(100));
  const grpc::StatusCode code = short_call.Finish().error_code();
  EXPECT_TRUE(code == grpc::StatusCode::DEADLINE_EXCEEDED ||
              code == grpc::StatusCode::UNAVAILABLE)
      << code;
  cluster.ExpectIdle();
}

TEST(WorkerFailureTest, BadRequestsNameTheField) {
  Cluster cluster(Demo());
  const int vocab = VocabSize(Demo().decode);
  struct Case {
    iv1::SequenceSpec spec;
    std::string field;
  };
  std::vector<Case> cases;
  cases.push_back({Spec({}, 4), "prompt"});
  cases.push_back({Spec({1, 2, vocab + 7}, 4), "prompt"});
  cases.push_back({Spec({1, 2, -1}, 4), "prompt"});
  {
    auto s = Spec({1, 2, 3}, 4);
    s.add_output_ids(vocab);
    cases.push_back({s, "output_ids"});
  }
  {
    auto s = Spec({1, 2, 3}, 4);
    s.mutable_sampling()->set_temperature(-1.0f);
    cases.push_back({s, "temperature"});
  }
  for (const Case& c : cases) {
    SCOPED_TRACE(c.field);
    for (bool local : {false, true}) {
      DecodeStream d(cluster, c.spec, local);
      EXPECT_FALSE(d.got_first);
      const grpc::Status s = d.Finish();
      EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
      EXPECT_TRUE(Contains(s.error_message(), c.field)) << s.error_message();
    }
    iv1::LandingTicket ticket;  // the request is checked before the ticket
    const grpc::Status s = CallPrefill(cluster, c.spec, &ticket);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_TRUE(Contains(s.error_message(), c.field)) << s.error_message();
  }
  cluster.ExpectIdle();
}

TEST(WorkerFailureTest, DrainingRefusesNewCallsAndFinishesRunningOnes) {
  Cluster cluster(Demo());
  const auto spec = Spec(Prompt(9, 6, VocabSize(Demo().decode)), 6);
  DecodeStream running(cluster, spec);
  ASSERT_TRUE(running.first.has_ticket());

  cluster.decode().StartDrain();
  cluster.prefill().StartDrain();
  EXPECT_TRUE(cluster.decode().draining());
  EXPECT_TRUE(cluster.prefill().draining());
  DecodeStream refused(cluster, spec);
  EXPECT_FALSE(refused.got_first);
  const grpc::Status s = refused.Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(s.error_message(), "draining");
  const grpc::Status ps = CallPrefill(cluster, spec, &running.first.ticket());
  EXPECT_EQ(ps.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(ps.error_message(), "draining");
  grpc::ClientContext ctx;
  iv1::GetInfoResponse info;
  ASSERT_TRUE(cluster.decode_info_stub().GetInfo(&ctx, iv1::GetInfoRequest(), &info).ok());
  EXPECT_TRUE(info.draining());

  // The call admitted before draining goes on; its KV comes from a prefill worker that is not
  // draining (another cluster's).
  Cluster other(Demo());
  iv1::PrefillRequest req;
  *req.mutable_seq() = spec;
  *req.mutable_ticket() = running.first.ticket();
  grpc::ClientContext pctx;
  iv1::PrefillResponse presp;
  ASSERT_TRUE(other.prefill_stub().Prefill(&pctx, req, &presp).ok());
  const auto rest = running.ReadTokens(1);
  EXPECT_EQ(rest.size(), 5u);
  EXPECT_TRUE(running.Finish().ok());
  cluster.ExpectIdle();
  other.ExpectIdle();
}

TEST(WorkerFailureTest, ShutdownEndsEveryCallUnavailable) {
  Cluster cluster(Demo());
  const int vocab = VocabSize(Demo().decode);
  const auto waiting_spec = Spec(Prompt(20, 7, vocab), 4);
  const auto running_spec = Spec(Prompt(8, 8, vocab), 480);
  DecodeStream waiting(cluster, waiting_spec);
  ASSERT_TRUE(waiting.first.has_ticket());
  DecodeStream running(cluster, running_spec, /*local_prefill=*/true);
  ASSERT_TRUE(running.first.local_prefill());
  EXPECT_GE(running.ReadSome(2), 2);

  cluster.decode().Shutdown();
  EXPECT_EQ(waiting.Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(running.Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_FALSE(cluster.decode().Healthy());
  EXPECT_TRUE(cluster.prefill().Healthy());
  DecodeStream after(cluster, waiting_spec);
  EXPECT_EQ(after.Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  cluster.decode().Shutdown();  // idempotent

  Eventually([&] {
    return cluster.decode().in_flight() == 0 &&
           cluster.decode().free_blocks() == cluster.decode().total_blocks();
  });
  EXPECT_EQ(cluster.decode().in_flight(), 0);
  EXPECT_EQ(cluster.decode().free_blocks(), cluster.decode().total_blocks());
  EXPECT_EQ(cluster.decode().CheckKvInvariants(), "");
}

TEST(WorkerFailureTest, PrefillShutdownAbortsItsTransfers) {
  ClusterOptions o = Demo();
  o.prefill.max_batch_tokens = 1;
  Cluster cluster(o);
  const int len = 480;
  const auto spec = Spec(Prompt(len, 9, VocabSize(o.decode)), 8);
  DecodeStream d(cluster, spec);
  ASSERT_TRUE(d.first.has_ticket());
  iv1::PrefillRequest req;
  *req.mutable_seq() = spec;
  *req.mutable_ticket() = d.first.ticket();
  grpc::ClientContext pctx;
  iv1::PrefillResponse presp;
  std::promise<grpc::Status> done;
  cluster.prefill_stub().async()->Prefill(&pctx, &req, &presp,
                                          [&](grpc::Status s) { done.set_value(std::move(s)); });
  EXPECT_TRUE(Eventually([&] {
    const int64_t queued = cluster.prefill().Load().queued_prefill_tokens();
    return queued > 0 && queued < len;
  }));
  cluster.prefill().Shutdown();
  EXPECT_EQ(done.get_future().get().error_code(), grpc::StatusCode::UNAVAILABLE);
  const grpc::Status ds = d.Finish();
  EXPECT_EQ(ds.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(Contains(ds.error_message(), "KV transfer failed")) << ds.error_message();
  EXPECT_FALSE(cluster.prefill().Healthy());
  EXPECT_TRUE(Eventually([&] {
    return cluster.prefill().free_blocks() == cluster.prefill().total_blocks() &&
           cluster.decode().free_blocks() == cluster.decode().total_blocks() &&
           cluster.decode().in_flight() == 0 && cluster.prefill().in_flight() == 0;
  }));
  EXPECT_EQ(cluster.prefill().CheckKvInvariants(), "");
  EXPECT_EQ(cluster.decode().CheckKvInvariants(), "");
}

}  // namespace
}  // namespace tandem
