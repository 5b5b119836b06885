// The workers' step loop (server/common/engine_loop.h): commands run on the loop thread in
// order, token events reach the sequence's observer, a loop that stops stepping while it has
// work turns unhealthy and recovers, and Stop runs what was accepted before it.
#include "server/common/engine_loop.h"

#include <gtest/gtest.h>

#include "absl/synchronization/notification.h"
#include "tests/workers/worker_test_util.h"

namespace tandem {
namespace {

using namespace testing_util;  // NOLINT(build/namespaces)

class Collector : public SequenceObserver {
 public:
  void OnTokenEvent(TokenEvent& ev) override {
    ids.push_back(ev.token);
    if (ev.finish != FinishReason::kNone) done.Notify();
  }
  std::vector<int32_t> ids;  // loop thread until `done`
  absl::Notification done;
};

std::unique_ptr<EngineLoop> MakeLoop() {
  auto engine = Engine::Create(Options(DemoModelDir(), 16, DType::kF32));
  EXPECT_TRUE(engine.ok()) << engine.status();
  EngineLoopOptions options;
  options.role = "test";
  auto loop = std::make_unique<EngineLoop>(*std::move(engine), std::move(options));
  loop->Start();
  return loop;
}

SequenceRequest Request(int max_tokens) {
  SequenceRequest r;
  r.prompt_ids = {5, 6, 7, 8};
  r.sampling.temperature = 0.0f;
  r.sampling.ignore_eos = true;
  r.sampling.max_tokens = max_tokens;
  return r;
}

TEST(EngineLoopTest, RoutesEventsToTheWatcherAndRefreshesTheLoad) {
  auto loop = MakeLoop();
  Collector c;
  ASSERT_TRUE(loop->Post([&] {
    auto id = loop->engine().Add(Request(6));
    ASSERT_TRUE(id.ok());
    loop->Watch(*id, &c);
  }));
  c.done.WaitForNotification();
  EXPECT_EQ(c.ids.size(), 6u);
  EXPECT_TRUE(Eventually([&] { return loop->Load().running == 0; }));
  EXPECT_EQ(loop->Load().free_blocks, loop->Load().total_blocks);
  EXPECT_TRUE(loop->Healthy(std::chrono::seconds(30)));
}

TEST(EngineLoopTest, AStuckLoopWithWorkTurnsUnhealthyAndRecovers) {
  auto loop = MakeLoop();
  Collector c;
  absl::Notification release;
  ASSERT_TRUE(loop->Post([&] {
    auto id = loop->engine().Add(Request(40));
    ASSERT_TRUE(id.ok());
    loop->Watch(*id, &c);
  }));
  // Blocks the loop thread while its engine has work (as a hung step would).
  ASSERT_TRUE(loop->Post([&] { release.WaitForNotification(); }));
  EXPECT_TRUE(Eventually([&] { return !loop->Healthy(std::chrono::milliseconds(50)); }));
  release.Notify();
  c.done.WaitForNotification();
  EXPECT_TRUE(loop->Healthy(std::chrono::milliseconds(50)));
}

TEST(EngineLoopTest, StopRunsAcceptedCommandsThenTheLastOneAndRefusesMore) {
  auto loop = MakeLoop();
  std::vector<int> order;  // loop thread, then read after Stop joined it
  ASSERT_TRUE(loop->Post([&] { order.push_back(1); }));
  ASSERT_TRUE(loop->Post([&] { order.push_back(2); }));
  loop->Stop([&] { order.push_back(3); });
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
  EXPECT_FALSE(loop->Post([&] { order.push_back(4); }));
  EXPECT_FALSE(loop->Healthy(std::chrono::seconds(30)));
  loop->Stop([&] { order.push_back(5); });  // idempotent
  EXPECT_EQ(order.size(), 3u);
}

}  // namespace
}  // namespace tandem
