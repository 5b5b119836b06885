// What every Generate call of one router shares: options, the served model, the worker pool,
// admission, and the set of live calls (for drain and shutdown).
#pragma once

#include <atomic>
#include <unordered_set>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "router/internal/admission.h"
#include "router/internal/prepare.h"
#include "router/internal/worker_pool.h"
#include "router/router.h"

namespace tandem {

class GenerateCall;

struct RouterCore {
  RouterCore(RouterOptions opts, ServedModel served, WorkerPoolOptions pool_options)
      : options(std::move(opts)),
        model(std::move(served)),
        pool(std::move(pool_options)),
        admission(options.max_running, options.max_queued) {}

  const RouterOptions options;
  const ServedModel model;
  WorkerPool pool;
  AdmissionQueue admission;
  std::atomic<bool> draining{false};
  std::atomic<bool> shutting_down{false};
  absl::Mutex mu;
  int in_flight ABSL_GUARDED_BY(mu) = 0;  // Generate calls whose server side is not done
  // Every GenerateCall object alive; each removes itself in its destructor.
  std::unordered_set<GenerateCall*> calls ABSL_GUARDED_BY(mu);
};

}  // namespace tandem
