// Reading (mmap, zero-copy) and writing Hugging Face safetensors files.
//
// Model folders are untrusted input (DESIGN §9): the header is at most 100 MB, every tensor's
// offsets lie inside the data section and do not overlap, numel x dtype size == end - begin
// (with overflow checks), and dtypes other than F32/F16/BF16 are refused by name.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kvcache/dtype.h"

namespace tandem {

struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const std::byte* data = nullptr;  // points into the mapping; valid while the file/set lives
  size_t nbytes = 0;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// One mapped .safetensors file.
class SafetensorsFile {
 public:
  // Maps `path` read-only and validates the header. Errors name the file and the tensor.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // Parses an in-memory image (tests, fuzzing). `bytes` must outlive the result.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBuffer(const std::byte* bytes,
                                                                     size_t size,
                                                                     std::string name);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const TensorView* Find(std::string_view name) const;
  const std::map<std::string, TensorView, std::less<>>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  // Validates the image [bytes, bytes + size) and fills tensors_/metadata_ with views into it.
  // `name` (the path or a label) prefixes every error.
  absl::Status ParseImage(const std::byte* bytes, size_t size, const std::string& name);

  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorView, std::less<>> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All weights of a model folder: `model.safetensors`, or the shards named by
// `model.safetensors.index.json` (every shard listed there must exist and hold the tensors the
// index assigns to it).
class WeightSet {
 public:
  static absl::StatusOr<std::unique_ptr<WeightSet>> OpenDir(const std::string& dir);

  const TensorView* Find(std::string_view name) const;
  // The tensor, or NOT_FOUND / INVALID_ARGUMENT naming it when missing or of another shape.
  absl::StatusOr<const TensorView*> Require(std::string_view name,
                                            const std::vector<int64_t>& shape) const;
  size_t total_bytes() const;

 private:
  std::string dir_;  // for error messages
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*, std::less<>> index_;
};

// One tensor to write; `data` holds numel x DTypeSize(dtype) bytes, little-endian.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<std::byte> data;
};

// Writes a safetensors file (tensors sorted by name, 8-byte aligned header as HF writes it).
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace tandem
