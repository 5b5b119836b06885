// Router Generate flow against fake workers over real loopback gRPC: disaggregated and local
// prefill, index ordering, stop strings, re-admission after failures, validation, admission,
// cancellation, deadlines and drain.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "engine/tokenizer.h"
#include "tests/router/router_harness.h"

namespace tandem::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

std::vector<int32_t> Prefix(const std::vector<int32_t>& v, size_t n) {
  return {v.begin(), v.begin() + static_cast<std::ptrdiff_t>(std::min(n, v.size()))};
}

std::vector<int32_t> Ids(const google::protobuf::RepeatedField<int32_t>& f) {
  return {f.begin(), f.end()};
}

// A router over the demo model (which has a tokenizer), fakes tokenising a fixed sentence.
class GenerateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto tok = Tokenizer::FromDir(DemoModelDir());
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = *std::move(tok);
    auto ids = tokenizer_->Encode("Hello world, this is a test of the router. ", false);
    ASSERT_TRUE(ids.ok());
    script_.ids = *ids;
    fingerprint_ = FingerprintOf(DemoModelDir());
  }

  RouterOptions Options() const {
    RouterOptions o;
    o.model_dir = DemoModelDir();
    o.heartbeat_interval = seconds(30);
    return o;
  }
  std::unique_ptr<FakeWorker> Worker(Role role, const std::string& name) {
    return std::make_unique<FakeWorker>(role, name, fingerprint_, script_, &board_);
  }
  std::string Text(const std::vector<int32_t>& ids) {
    auto t = tokenizer_->Decode(ids, /*skip_special_tokens=*/true);
    EXPECT_TRUE(t.ok());
    return t.ok() ? *t : "";
  }

  std::unique_ptr<Tokenizer> tokenizer_;
  TokenScript script_;
  uint64_t fingerprint_ = 0;
  SignalBoard board_;
};

TEST_F(GenerateTest, DisaggregatedStreamsTextLogprobsAndUsage) {
  RouterHarness h(Options());
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  auto p1 = Worker(internal::v1::ROLE_PREFILL, "p1");
  PrefillBehavior pb;
  pb.cached_tokens = 16;
  p1->set_prefill(pb);
  h.Add(*d1, DecodeLoad(100));
  h.Add(*p1, PrefillLoad(0));

  v1::GenerateRequest req;
  req.set_text("The quick brown fox");
  req.set_add_special_tokens(true);
  req.set_request_id("req-1");
  req.mutable_sampling()->set_max_tokens(12);
  req.mutable_sampling()->set_logprobs(2);
  auto prompt = tokenizer_->Encode("The quick brown fox", true);
  ASSERT_TRUE(prompt.ok());

  GenerateResult r = h.Generate(req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const std::vector<int32_t> expected = script_.Expected(*prompt, 12);
  EXPECT_EQ(r.ids, expected);
  EXPECT_EQ(r.text, Text(expected));
  EXPECT_FALSE(r.text.empty());
  EXPECT_EQ(r.finish_reason, "length");
  EXPECT_TRUE(r.finish_only_on_last);
  EXPECT_EQ(r.usage.prompt_tokens(), static_cast<int>(prompt->size()));
  EXPECT_EQ(r.usage.completion_tokens(), 12);
  EXPECT_EQ(r.usage.cached_prompt_tokens(), 16);
  ASSERT_EQ(r.logprobs.size(), 12u);
  for (int i = 0; i < 12; ++i) {
    EXPECT_FLOAT_EQ(r.logprobs[i].logprob(), FakeLogprob(i));
    ASSERT_EQ(r.logprobs[i].top_size(), 2);
    EXPECT_EQ(r.logprobs[i].top(1).token_id(), script_.At(*prompt, i + 1));
  }

  const FakeStats ds = d1->stats();
  ASSERT_EQ(ds.calls, 1);
  EXPECT_FALSE(ds.decode_requests[0].local_prefill());
  EXPECT_EQ(Ids(ds.decode_requests[0].seq().prompt_ids()), *prompt);
  EXPECT_EQ(ds.decode_requests[0].seq().output_ids_size(), 0);
  EXPECT_EQ(ds.decode_requests[0].seq().sampling().max_tokens(), 12);
  EXPECT_EQ(ds.decode_requests[0].seq().request_id(), "req-1");
  const FakeStats ps = p1->stats();
  ASSERT_EQ(ps.calls, 1);
  EXPECT_EQ(Ids(ps.prefill_requests[0].seq().prompt_ids()), *prompt);
  EXPECT_EQ(ps.prefill_requests[0].ticket().model_fingerprint(), fingerprint_);
  EXPECT_NE(ps.prefill_requests[0].ticket().transfer_id(), 0u);
}

TEST_F(GenerateTest, EmitsTokensOnceInIndexOrderWhenDecodeRacesPrefill) {
  RouterHarness h(Options());
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  auto p1 = Worker(internal::v1::ROLE_PREFILL, "p1");
  DecodeBehavior db;
  db.early_tokens = 3;     // indices 0..2 arrive with the ticket, before Prefill returns
  db.first_id_offset = 1;  // and the decode copy of index 0 differs: Prefill's is authoritative
  db.tokens_per_message = 2;
  d1->set_decode(db);
  h.Add(*d1, DecodeLoad(100));
  h.Add(*p1, PrefillLoad(0));

  const std::vector<int32_t> prompt = {10, 11, 12, 13, 14};
  GenerateResult r = h.Generate(IdsRequest(prompt, 9));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids, script_.Expected(prompt, 9));
  EXPECT_EQ(r.text, Text(r.ids));
  EXPECT_EQ(r.usage.completion_tokens(), 9);
}

TEST_F(GenerateTest, LocalPrefillWhenColocatedOrWithoutPrefillWorkers) {
  for (bool disaggregated : {false, true}) {
    SCOPED_TRACE(disaggregated ? "no prefill worker" : "colocated");
    RouterOptions o = Options();
    o.disaggregated = disaggregated;
    RouterHarness h(o);
    auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
    DecodeBehavior db;
    db.cached_tokens = 8;
    d1->set_decode(db);
    h.Add(*d1, DecodeLoad(100));
    std::unique_ptr<FakeWorker> p1;
    if (!disaggregated) {
      p1 = Worker(internal::v1::ROLE_PREFILL, "p1");
      h.Add(*p1);
    }
    const std::vector<int32_t> prompt = {1, 2, 3, 4};
    GenerateResult r = h.Generate(IdsRequest(prompt, 6));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.ids, script_.Expected(prompt, 6));
    EXPECT_EQ(r.usage.cached_prompt_tokens(), 8);
    ASSERT_EQ(d1->stats().calls, 1);
    EXPECT_TRUE(d1->stats().decode_requests[0].local_prefill());
    if (p1) {
      EXPECT_EQ(p1->stats().calls, 0);
    }
  }
}

TEST_F(GenerateTest, StopStringCutsTextAndCancelsDecode) {
  RouterHarness h(Options());
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  auto p1 = Worker(internal::v1::ROLE_PREFILL, "p1");
  DecodeBehavior db;
  db.hang_after = 30;  // the stream stays open: only the router's cancel ends it
  d1->set_decode(db);
  h.Add(*d1, DecodeLoad(100));
  h.Add(*p1);

  const std::vector<int32_t> prompt = {7, 8, 9};
  v1::GenerateRequest req = IdsRequest(prompt, 40);
  req.mutable_sampling()->add_stop(" is");
  req.mutable_sampling()->add_stop("never-there");
  GenerateResult r = h.Generate(req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const std::string full = Text(script_.Expected(prompt, 30));
  const size_t cut = full.find(" is");
  ASSERT_NE(cut, std::string::npos);
  EXPECT_EQ(r.text, full.substr(0, cut));
  EXPECT_EQ(r.finish_reason, "stop");
  EXPECT_EQ(r.ids, Prefix(script_.Expected(prompt, 40), r.ids.size()));
  EXPECT_NE(Text(r.ids).find(" is"), std::string::npos);
  EXPECT_EQ(r.usage.completion_tokens(), static_cast<int>(r.ids.size()));
  EXPECT_TRUE(d1->WaitFor([](const FakeStats& s) { return s.cancellations == 1 && s.done == 1; }));
}

TEST_F(GenerateTest, DecodeFailureMidStreamReadmitsWithTokensSent) {
  RouterHarness h(Options());  // no prefill worker: local prefill, so the failure point is exact
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  auto d2 = Worker(internal::v1::ROLE_DECODE, "d2");
  DecodeBehavior fails;
  fails.fail_after = 3;
  d1->set_decode(fails);
  h.Add(*d1, DecodeLoad(1000));  // most free blocks: picked first
  h.Add(*d2, DecodeLoad(500));

  const std::vector<int32_t> prompt = {3, 1, 4, 1, 5};
  GenerateResult r = h.Generate(IdsRequest(prompt, 10));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const std::vector<int32_t> expected = script_.Expected(prompt, 10);
  EXPECT_EQ(r.ids, expected);  // nothing lost, nothing repeated
  EXPECT_EQ(r.text, Text(expected));
  EXPECT_EQ(r.usage.completion_tokens(), 10);
  ASSERT_EQ(d1->stats().calls, 1);
  ASSERT_EQ(d2->stats().calls, 1);
  const DecodeRequest again = d2->stats().decode_requests[0];
  EXPECT_EQ(Ids(again.seq().output_ids()), Prefix(expected, 3));
  EXPECT_EQ(Ids(again.seq().prompt_ids()), prompt);
  EXPECT_EQ(again.seq().sampling().max_tokens(), 10);
}

TEST_F(GenerateTest, DisaggregatedDecodeFailureReadmitsThroughPrefillAgain) {
  RouterHarness h(Options());
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  auto d2 = Worker(internal::v1::ROLE_DECODE, "d2");
  auto p1 = Worker(internal::v1::ROLE_PREFILL, "p1");
  DecodeBehavior fails;
  fails.fail_after = 4;
  d1->set_decode(fails);
  h.Add(*d1, DecodeLoad(1000));
  h.Add(*d2, DecodeLoad(500));
  h.Add(*p1);

  const std::vector<int32_t> prompt = {2, 7, 1, 8};
  GenerateResult r = h.Generate(IdsRequest(prompt, 12));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const std::vector<int32_t> expected = script_.Expected(prompt, 12);
  EXPECT_EQ(r.ids, expected);
  ASSERT_EQ(d2->stats().calls, 1);
  ASSERT_EQ(p1->stats().calls, 2);
  // Whatever reached the client before the failure is what the second attempt continues from.
  const std::vector<int32_t> sent = Ids(d2->stats().decode_requests[0].seq().output_ids());
  EXPECT_LE(sent.size(), 4u);
  EXPECT_EQ(sent, Prefix(expected, sent.size()));
  EXPECT_EQ(Ids(p1->stats().prefill_requests[1].seq().output_ids()), sent);
}

TEST_F(GenerateTest, PrefillFailureCancelsDecodeAndReadmits) {
  RouterHarness h(Options());
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  auto p1 = Worker(internal::v1::ROLE_PREFILL, "p1");
  auto p2 = Worker(internal::v1::ROLE_PREFILL, "p2");
  PrefillBehavior broken;
  broken.fail = grpc::StatusCode::INTERNAL;
  p1->set_prefill(broken);
  h.Add(*d1, DecodeLoad(100));
  h.Add(*p1, PrefillLoad(0));  // least queued: picked first
  h.Add(*p2, PrefillLoad(1000));

  const std::vector<int32_t> prompt = {9, 9, 9};
  GenerateResult r = h.Generate(IdsRequest(prompt, 5));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids, script_.Expected(prompt, 5));
  EXPECT_EQ(p1->stats().calls, 1);
  EXPECT_EQ(p2->stats().calls, 1);
  EXPECT_EQ(d1->stats().calls, 2);
  // The first Decode call waited for KV that never came: the router cancelled it.
  EXPECT_TRUE(d1->WaitFor([](const FakeStats& s) { return s.cancellations >= 1; }));
  EXPECT_FALSE(d1->stats().decode_requests[1].local_prefill());
}

TEST_F(GenerateTest, PrefillFailureFallsBackToLocalPrefill) {
  RouterHarness h(Options());
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  auto p1 = Worker(internal::v1::ROLE_PREFILL, "p1");
  PrefillBehavior broken;
  broken.fail = grpc::StatusCode::UNAVAILABLE;
  p1->set_prefill(broken);
  h.Add(*d1, DecodeLoad(100));
  h.Add(*p1);

  const std::vector<int32_t> prompt = {4, 4};
  GenerateResult r = h.Generate(IdsRequest(prompt, 5));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids, script_.Expected(prompt, 5));
  ASSERT_EQ(d1->stats().calls, 2);
  EXPECT_TRUE(d1->stats().decode_requests[1].local_prefill());
}

TEST_F(GenerateTest, GivesUpAfterMaxAttempts) {
  RouterOptions o = Options();
  o.max_attempts = 2;
  RouterHarness h(o);
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  auto d2 = Worker(internal::v1::ROLE_DECODE, "d2");
  DecodeBehavior fails;
  fails.fail_after = 1;
  d1->set_decode(fails);
  d2->set_decode(fails);
  h.Add(*d1, DecodeLoad(1000));
  h.Add(*d2, DecodeLoad(500));

  const std::vector<int32_t> prompt = {1, 1, 2, 3};
  GenerateResult r = h.Generate(IdsRequest(prompt, 8));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(r.status.error_message(),
            "request failed after 2 attempts: decode worker d2 failed (UNAVAILABLE)");
  EXPECT_EQ(r.ids, script_.Expected(prompt, 2));  // what each attempt produced, once
  EXPECT_EQ(d1->stats().calls, 1);
  EXPECT_EQ(d2->stats().calls, 1);
}

TEST_F(GenerateTest, MapsWorkerStatuses) {
  RouterOptions o = Options();
  o.max_attempts = 2;
  RouterHarness h(o);
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  DecodeBehavior db;
  db.reject = grpc::StatusCode::INVALID_ARGUMENT;
  d1->set_decode(db);
  h.Add(*d1, DecodeLoad(100));

  // INVALID_ARGUMENT: the request is bad everywhere; no retry, our own wording.
  GenerateResult r = h.Generate(IdsRequest({1, 2}, 4));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(r.status.error_message().rfind("request refused as invalid by decode worker d1", 0), 0u)
      << r.status.error_message();
  EXPECT_EQ(d1->stats().calls, 1);

  // Anything else becomes UNAVAILABLE after the retries.
  db.reject = grpc::StatusCode::RESOURCE_EXHAUSTED;
  d1->set_decode(db);
  r = h.Generate(IdsRequest({1, 2}, 4));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(r.status.error_message(),
            "request failed after 2 attempts: decode worker d1 failed (RESOURCE_EXHAUSTED)");
  EXPECT_EQ(d1->stats().calls, 3);
}

TEST_F(GenerateTest, RejectsBadRequestsNamingTheFieldAndKeepsServing) {
  RouterHarness h(Options());
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  h.Add(*d1, DecodeLoad(100));
  const std::vector<int32_t> ok_prompt = {1, 2, 3};
  const int context = 512;  // the demo model's max_position_embeddings

  struct Case {
    std::string field;
    std::function<void(v1::GenerateRequest*)> edit;
  };
  const std::vector<Case> cases = {
      {"prompt", [](v1::GenerateRequest* r) { r->clear_prompt(); }},
      {"prompt", [](v1::GenerateRequest* r) { r->set_text(""); }},
      {"prompt", [](v1::GenerateRequest* r) { r->mutable_token_ids()->clear_ids(); }},
      {"prompt",
       [&](v1::GenerateRequest* r) {
         r->mutable_token_ids()->clear_ids();
         for (int i = 0; i < context; ++i) r->mutable_token_ids()->add_ids(5);
       }},
      {"prompt.token_ids", [](v1::GenerateRequest* r) { r->mutable_token_ids()->add_ids(2048); }},
      {"prompt.token_ids", [](v1::GenerateRequest* r) { r->mutable_token_ids()->add_ids(-1); }},
      {"max_tokens", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_max_tokens(0); }},
      {"max_tokens", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_max_tokens(-3); }},
      {"max_tokens",
       [&](v1::GenerateRequest* r) {
         r->mutable_token_ids()->clear_ids();
         for (int i = 0; i < context - 10; ++i) r->mutable_token_ids()->add_ids(5);
         r->mutable_sampling()->set_max_tokens(11);
       }},
      {"temperature", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_temperature(-1); }},
      {"temperature",
       [](v1::GenerateRequest* r) {
         r->mutable_sampling()->set_temperature(std::numeric_limits<float>::quiet_NaN());
       }},
      {"top_p", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_top_p(0); }},
      {"top_p", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_top_p(1.5f); }},
      {"top_k", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_top_k(-2); }},
      {"model", [](v1::GenerateRequest* r) { r->set_model("some-other-model"); }},
      {"stop",
       [](v1::GenerateRequest* r) {
         for (int i = 0; i < 17; ++i) r->mutable_sampling()->add_stop("s" + std::to_string(i));
       }},
      {"stop_token_ids",
       [](v1::GenerateRequest* r) { r->mutable_sampling()->add_stop_token_ids(4096); }},
      {"logprobs", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_logprobs(21); }},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    v1::GenerateRequest req = IdsRequest(ok_prompt, 4);
    cases[i].edit(&req);
    GenerateResult r = h.Generate(req);
    SCOPED_TRACE("case " + std::to_string(i) + ": " + std::to_string(r.status.error_code()) + " " +
                 r.status.error_message());
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(r.status.error_message().rfind(cases[i].field + ": ", 0), 0u);
    EXPECT_EQ(r.messages, 0);
  }
  EXPECT_EQ(d1->stats().calls, 0);

  // Good requests still work, including an unset max_tokens near the end of the context
  // (cut to what is left) and the served model's name.
  GenerateResult r = h.Generate(IdsRequest(ok_prompt, 4));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids, script_.Expected(ok_prompt, 4));
  v1::GenerateRequest near_end;
  for (int i = 0; i < context - 3; ++i) near_end.mutable_token_ids()->add_ids(5);
  near_end.set_model("demo-model");
  r = h.Generate(near_end);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids.size(), 3u);
  EXPECT_EQ(d1->stats().decode_requests.back().seq().sampling().max_tokens(), 3);
}

TEST_F(GenerateTest, ModelWithoutTokenizerServesTokenIdsOnly) {
  const std::string dir = FixtureModelDir();
  RouterOptions o = Options();
  o.model_dir = dir;
  o.model_name = "fixture";
  RouterHarness h(o);
  const TokenScript script{{5, 17, 33, 99, 250, 7, 512, 1000}};
  FakeWorker d1(internal::v1::ROLE_DECODE, "d1", FingerprintOf(dir), script, &board_);
  h.Add(d1, DecodeLoad(100));

  v1::GenerateRequest req;
  req.set_text("hello");
  GenerateResult r = h.Generate(req);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(r.status.error_message().rfind("prompt.text: model has no tokenizer", 0), 0u);

  req = IdsRequest({1, 2, 3}, 5);
  req.mutable_sampling()->add_stop("x");
  r = h.Generate(req);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(r.status.error_message().rfind("stop: ", 0), 0u);

  r = h.Generate(IdsRequest({1, 2, 3}, 5));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids, script.Expected(std::vector<int32_t>{1, 2, 3}, 5));
  EXPECT_TRUE(r.text.empty());

  grpc::ClientContext ctx;
  v1::TokenizeRequest treq;
  treq.set_text("hello");
  v1::TokenizeResponse tresp;
  EXPECT_EQ(h.api().Tokenize(&ctx, treq, &tresp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(GenerateTest, OverloadRejectsTheExcessAndCompletesTheRest) {
  RouterOptions o = Options();
  o.max_running = 1;
  o.max_queued = 2;
  RouterHarness h(o);
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  DecodeBehavior slow;
  slow.gated = true;  // nothing moves until the test opens the gate
  d1->set_decode(slow);
  h.Add(*d1, DecodeLoad(100));

  constexpr int kRequests = 10;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<GenerateResult> results;
  std::vector<std::thread> clients;
  const std::vector<int32_t> prompt = {6, 6, 6};
  for (int i = 0; i < kRequests; ++i) {
    clients.emplace_back([&] {
      GenerateResult r = h.Generate(IdsRequest(prompt, 4));
      std::lock_guard<std::mutex> l(mu);
      results.push_back(std::move(r));
      cv.notify_all();
    });
  }
  auto count = [&](grpc::StatusCode code) {
    int n = 0;
    for (const auto& r : results) n += r.status.error_code() == code ? 1 : 0;
    return n;
  };
  {
    std::unique_lock<std::mutex> l(mu);
    ASSERT_TRUE(cv.wait_for(l, seconds(20), [&] { return results.size() == 7; }));
    EXPECT_EQ(count(grpc::StatusCode::RESOURCE_EXHAUSTED), 7);
  }
  ASSERT_TRUE(d1->WaitFor([](const FakeStats& s) { return s.calls >= 1; }));
  EXPECT_EQ(d1->stats().calls, 1);  // one running; two wait in the router's queue
  d1->OpenGate();
  for (auto& t : clients) t.join();
  EXPECT_EQ(count(grpc::StatusCode::OK), 3);
  EXPECT_EQ(count(grpc::StatusCode::RESOURCE_EXHAUSTED), 7);
  for (const auto& r : results) {
    if (r.status.ok()) {
      EXPECT_EQ(r.ids, script_.Expected(prompt, 4));
    } else {
      EXPECT_EQ(r.messages, 0);
      EXPECT_NE(r.status.error_message().find("overloaded"), std::string::npos);
    }
  }
  EXPECT_EQ(d1->stats().calls, 3);
}

TEST_F(GenerateTest, CancelWhileQueuedFreesTheQueueSlot) {
  RouterOptions o = Options();
  o.max_running = 1;
  o.max_queued = 1;
  RouterHarness h(o);
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  DecodeBehavior gated;
  gated.gated = true;
  d1->set_decode(gated);
  h.Add(*d1, DecodeLoad(100));
  const std::vector<int32_t> prompt = {2, 4, 6};

  GenerateResult first;
  std::thread running([&] { first = h.Generate(IdsRequest(prompt, 3)); });
  ASSERT_TRUE(d1->WaitFor([](const FakeStats& s) { return s.calls == 1; }));

  // Queued behind it; its client gives up (deadline), which the router sees as a cancel.
  GenerateResult second = h.Generate(IdsRequest(prompt, 3), milliseconds(300));
  EXPECT_EQ(second.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  ASSERT_TRUE(h.router().AwaitInFlight([](int n) { return n == 1; }, seconds(10)));
  // Its slot in the queue is free again: one more request waits instead of being refused.
  GenerateResult third;
  std::thread queued([&] { third = h.Generate(IdsRequest(prompt, 3)); });
  ASSERT_TRUE(h.router().AwaitInFlight([](int n) { return n == 2; }, seconds(10)));
  d1->OpenGate();
  running.join();
  queued.join();
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  ASSERT_TRUE(third.status.ok()) << third.status.error_message();
  EXPECT_EQ(third.ids, script_.Expected(prompt, 3));
  EXPECT_EQ(d1->stats().calls, 2);  // the cancelled request never reached a worker
}

TEST_F(GenerateTest, ShutdownEndsRunningCallsAndRefusesNewOnes) {
  RouterHarness h(Options());
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  DecodeBehavior gated;
  gated.gated = true;
  d1->set_decode(gated);
  h.Add(*d1, DecodeLoad(100));

  GenerateResult running;
  std::thread client([&] { running = h.Generate(IdsRequest({1, 2}, 4)); });
  ASSERT_TRUE(d1->WaitFor([](const FakeStats& s) { return s.calls == 1; }));
  h.router().Shutdown();
  client.join();
  EXPECT_EQ(running.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(running.status.error_message(), "router shutting down");
  EXPECT_TRUE(d1->WaitFor([](const FakeStats& s) { return s.cancellations == 1; }));
  GenerateResult late = h.Generate(IdsRequest({1, 2}, 4));
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  h.router().Shutdown();  // idempotent
}

TEST_F(GenerateTest, ClientCancelCancelsBothWorkerCalls) {
  RouterHarness h(Options());
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  auto p1 = Worker(internal::v1::ROLE_PREFILL, "p1");
  PrefillBehavior stuck;
  stuck.hang = true;
  p1->set_prefill(stuck);
  h.Add(*d1, DecodeLoad(100));
  h.Add(*p1);

  grpc::ClientContext ctx;
  auto reader = h.api().Generate(&ctx, IdsRequest({1, 2, 3}, 8));
  ASSERT_TRUE(p1->WaitFor([](const FakeStats& s) { return s.calls == 1; }));
  ctx.TryCancel();
  v1::GenerateResponse msg;
  EXPECT_FALSE(reader->Read(&msg));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(p1->WaitFor([](const FakeStats& s) { return s.cancellations == 1 && s.done == 1; }));
  EXPECT_TRUE(d1->WaitFor([](const FakeStats& s) { return s.cancellations == 1 && s.done == 1; }));
}

TEST_F(GenerateTest, ClientDeadlinePropagatesToWorkers) {
  RouterHarness h(Options());
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  auto p1 = Worker(internal::v1::ROLE_PREFILL, "p1");
  PrefillBehavior stuck;
  stuck.hang = true;
  p1->set_prefill(stuck);
  h.Add(*d1, DecodeLoad(100));
  h.Add(*p1);

  const auto before = std::chrono::system_clock::now();
  GenerateResult r = h.Generate(IdsRequest({1, 2, 3}, 8), milliseconds(300));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(p1->WaitFor([](const FakeStats& s) { return s.cancellations == 1; }));
  EXPECT_TRUE(d1->WaitFor([](const FakeStats& s) { return s.cancellations == 1; }));
  ASSERT_EQ(d1->stats().decode_deadlines.size(), 1u);
  EXPECT_LE(d1->stats().decode_deadlines[0], before + seconds(1));
}

TEST_F(GenerateTest, RequestTimeoutEndsTheCall) {
  RouterOptions o = Options();
  o.request_timeout = milliseconds(200);
  RouterHarness h(o);
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  DecodeBehavior db;
  db.hang_after = 1;
  d1->set_decode(db);
  h.Add(*d1, DecodeLoad(100));

  const std::vector<int32_t> prompt = {5, 6};
  GenerateResult r = h.Generate(IdsRequest(prompt, 8), seconds(20));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(r.status.error_message(), "request timed out after 200 ms");
  EXPECT_EQ(r.ids, script_.Expected(prompt, 1));
  EXPECT_TRUE(d1->WaitFor([](const FakeStats& s) { return s.cancellations == 1; }));
  ASSERT_EQ(d1->stats().decode_deadlines.size(), 1u);
  EXPECT_NE(d1->stats().decode_deadlines[0], std::chrono::system_clock::time_point::max());
}

TEST_F(GenerateTest, DrainRefusesNewRequestsAndFinishesRunningOnes) {
  RouterHarness h(Options());
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  DecodeBehavior gated;
  gated.gated = true;
  d1->set_decode(gated);
  h.Add(*d1, DecodeLoad(100));

  const std::vector<int32_t> prompt = {8, 8};
  GenerateResult running;
  std::thread client([&] { running = h.Generate(IdsRequest(prompt, 4)); });
  ASSERT_TRUE(d1->WaitFor([](const FakeStats& s) { return s.calls == 1; }));
  EXPECT_FALSE(h.router().draining());
  h.router().StartDrain();
  EXPECT_TRUE(h.router().draining());
  EXPECT_EQ(h.router().in_flight(), 1);
  GenerateResult refused = h.Generate(IdsRequest(prompt, 4));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(refused.status.error_message().find("draining"), std::string::npos);
  d1->OpenGate();
  client.join();
  ASSERT_TRUE(running.status.ok()) << running.status.error_message();
  EXPECT_EQ(running.ids, script_.Expected(prompt, 4));
}

TEST_F(GenerateTest, NoDecodeWorkerIsUnavailable) {
  RouterHarness h(Options());
  auto p1 = Worker(internal::v1::ROLE_PREFILL, "p1");
  h.Add(*p1);
  GenerateResult r = h.Generate(IdsRequest({1}, 2));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(r.status.error_message(), "no decode worker available");
}

TEST_F(GenerateTest, EvictedWorkerLosesItsRequestsToAnother) {
  RouterOptions o = Options();
  o.heartbeat_interval = milliseconds(100);
  o.missed_heartbeats = 3;
  RouterHarness h(o);
  auto d1 = Worker(internal::v1::ROLE_DECODE, "d1");
  auto d2 = Worker(internal::v1::ROLE_DECODE, "d2");
  DecodeBehavior stalls;
  stalls.hang_after = 2;  // then silent, connection open: only eviction gets the request out
  d1->set_decode(stalls);
  h.Add(*d1, DecodeLoad(1000));
  h.Add(*d2, DecodeLoad(500));
  auto pump1 = std::make_unique<HeartbeatPump>(&h, d1.get(), DecodeLoad(1000), milliseconds(15));
  HeartbeatPump pump2(&h, d2.get(), DecodeLoad(500), milliseconds(15));

  const std::vector<int32_t> prompt = {4, 3, 2, 1};
  size_t received = 0;
  GenerateResult r = h.Generate(IdsRequest(prompt, 7), seconds(20),
                                [&](grpc::ClientContext*, const v1::GenerateResponse& m) {
                                  received += m.token_ids_size();
                                  if (received >= 2 && pump1) {
                                    pump1.reset();  // d1 stops heartbeating
                                  }
                                });
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const std::vector<int32_t> expected = script_.Expected(prompt, 7);
  EXPECT_EQ(r.ids, expected);
  EXPECT_TRUE(d1->WaitFor([](const FakeStats& s) { return s.cancellations == 1; }));
  ASSERT_EQ(d2->stats().calls, 1);
  EXPECT_EQ(Ids(d2->stats().decode_requests[0].seq().output_ids()), Prefix(expected, 2));
}

TEST_F(GenerateTest, RestartedWorkerLosesItsRequests) {
  RouterHarness h(Options());
  auto old_d = Worker(internal::v1::ROLE_DECODE, "d");
  auto new_d = Worker(internal::v1::ROLE_DECODE, "d");  // same name, new process
  DecodeBehavior stalls;
  stalls.hang_after = 3;
  old_d->set_decode(stalls);
  old_d->set_incarnation(1);
  new_d->set_incarnation(2);
  h.Add(*old_d, DecodeLoad(100));

  const std::vector<int32_t> prompt = {1, 2};
  size_t received = 0;
  bool restarted = false;
  GenerateResult r = h.Generate(IdsRequest(prompt, 6), seconds(20),
                                [&](grpc::ClientContext*, const v1::GenerateResponse& m) {
                                  received += m.token_ids_size();
                                  if (received >= 3 && !restarted) {
                                    restarted = true;
                                    EXPECT_TRUE(h.Register(new_d->info()).ok());
                                  }
                                });
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids, script_.Expected(prompt, 6));
  EXPECT_TRUE(old_d->WaitFor([](const FakeStats& s) { return s.cancellations == 1; }));
  ASSERT_EQ(new_d->stats().calls, 1);
  EXPECT_EQ(new_d->stats().decode_requests[0].seq().output_ids_size(), 3);
}

TEST_F(GenerateTest, TokenizeAndListModels) {
  RouterHarness h(Options());
  grpc::ClientContext c1;
  v1::TokenizeRequest treq;
  treq.set_text("Hello world");
  treq.set_add_special_tokens(true);
  v1::TokenizeResponse tresp;
  ASSERT_TRUE(h.api().Tokenize(&c1, treq, &tresp).ok());
  auto ids = tokenizer_->Encode("Hello world", true);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(Ids(tresp.ids()), *ids);
  EXPECT_EQ(tresp.count(), static_cast<int>(ids->size()));
  EXPECT_EQ(tresp.max_model_len(), 512);

  grpc::ClientContext c2;
  treq.set_model("nope");
  EXPECT_EQ(h.api().Tokenize(&c2, treq, &tresp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  grpc::ClientContext c3;
  v1::ListModelsResponse models;
  ASSERT_TRUE(h.api().ListModels(&c3, v1::ListModelsRequest(), &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_EQ(models.models(0).id(), "demo-model");
  EXPECT_EQ(models.models(0).max_model_len(), 512);
  EXPECT_EQ(models.models(0).vocab_size(), 2048);
  EXPECT_EQ(models.models(0).architecture(), "LlamaForCausalLM");
  EXPECT_EQ(models.models(0).fingerprint().size(), 16u);
}

}  // namespace
}  // namespace tandem::testing
