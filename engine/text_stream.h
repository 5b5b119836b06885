// Streamed output text of one sequence: incremental detokenization, stop strings, and the
// hold-back rules shared by the engine and the router (which detokenizes for its clients).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "engine/tokenizer.h"

namespace tandem {

class TextStream {
 public:
  // `context` (prompt + tokens already emitted) is left context only; its text is not emitted.
  // `stop` strings end the text before their first occurrence.
  TextStream(const Tokenizer& tokenizer, std::span<const int32_t> context,
             std::vector<std::string> stop);

  // Appends one generated token and returns the text that is now safe to emit: complete UTF-8,
  // and no suffix that could still become the start of a stop string. Sets *stopped (and
  // returns the text before the match) when a stop string appears; nothing follows then.
  std::string Push(int32_t token, bool* stopped);
  // The sequence ended for another reason (EOS / stop id: `flush_tail` false; length: true):
  // returns the held-back text, plus the detokenizer's incomplete tail when `flush_tail`.
  std::string Finish(bool flush_tail);

 private:
  IncrementalDetokenizer detok_;
  std::vector<std::string> stop_;
  size_t max_stop_len_ = 0;
  std::string held_;
};

}  // namespace tandem
