// Timing points of one Generate request as the client sees them, kept apart from the request
// flow so that a metrics layer can read them without touching it (DESIGN §6: request-level
// latencies are measured at the router).
#pragma once

#include <chrono>
#include <cstdint>

namespace tandem {

struct RequestTiming {
  using Clock = std::chrono::steady_clock;

  Clock::time_point arrival;      // Generate received
  Clock::time_point dispatch;     // admitted (first attempt dispatched); queue time = - arrival
  Clock::time_point first_token;  // first token handed to the client stream
  Clock::time_point last_token;   // latest token handed to the client stream
  Clock::time_point end;          // outcome decided (finish, error, cancel)
  int64_t tokens = 0;             // tokens streamed to the client
  int attempts = 0;               // dispatch attempts (re-admissions = attempts - 1)

  // Records one token handed to the client; returns the gap since the previous token (zero for
  // the first one): the inter-token latency sample.
  Clock::duration MarkToken(Clock::time_point now) {
    Clock::duration gap{0};
    if (tokens == 0) {
      first_token = now;
    } else {
      gap = now - last_token;
    }
    last_token = now;
    ++tokens;
    return gap;
  }

  bool dispatched() const { return dispatch != Clock::time_point{}; }
  Clock::duration queue_time() const { return dispatched() ? dispatch - arrival : end - arrival; }
  Clock::duration time_to_first_token() const { return first_token - arrival; }
  Clock::duration end_to_end() const { return end - arrival; }
};

}  // namespace tandem
