// Transport-independent sender bookkeeping.
#include "kvcache/kv_sender.h"

#include "absl/strings/str_cat.h"
#include "kvcache/internal/strings.h"

namespace tandem {

absl::Status OutgoingTransfer::SendLayer(int32_t layer, const void* k, const void* v, DType dtype,
                                         std::shared_ptr<const void> keep_alive) {
  LayerSlice s;
  s.layer = layer;
  s.first_token = 0;
  s.token_count = token_count();
  s.k = k;
  s.v = v;
  s.dtype = dtype;
  s.keep_alive = std::move(keep_alive);
  return SendLayer(std::move(s));
}

namespace internal {

absl::Status SendSequencer::ValidateSpec(const OutgoingTransferSpec& spec) {
  const KvGeometry& g = spec.geometry;
  if (spec.transfer_id == 0) {
    return absl::InvalidArgumentError("transfer id 0 is reserved");
  }
  if (g.num_layers <= 0 || static_cast<uint32_t>(g.num_layers) > kMaxWireLayers ||
      g.num_kv_heads <= 0 || static_cast<uint32_t>(g.num_kv_heads) > kMaxWireKvHeads ||
      g.head_dim <= 0 || static_cast<uint32_t>(g.head_dim) > kMaxWireHeadDim) {
    return absl::InvalidArgumentError("geometry outside the wire limits");
  }
  if (spec.token_count <= 0 || static_cast<uint64_t>(spec.token_count) > kMaxWireTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("token count ", spec.token_count, " outside [1, ", kMaxWireTokens, "]"));
  }
  if (spec.start_position < 0 || static_cast<uint64_t>(spec.start_position) > kMaxWirePosition) {
    return absl::InvalidArgumentError("start position out of range");
  }
  return absl::OkStatus();
}

SendSequencer::SendSequencer(const OutgoingTransferSpec& spec)
    : geometry_(spec.geometry),
      dtype_(spec.dtype),
      token_count_(spec.token_count),
      token_bytes_(static_cast<uint64_t>(spec.geometry.token_elems()) * DTypeSize(spec.dtype)),
      next_token_(spec.geometry.num_layers, 0) {}

absl::Status SendSequencer::Accept(const LayerSlice& s) {
  if (s.layer < 0 || s.layer >= geometry_.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", s.layer, " outside [0, ", geometry_.num_layers, ")"));
  }
  if (s.dtype != dtype_) {
    return absl::InvalidArgumentError(absl::StrCat("slice dtype ", internal::Av(DTypeName(s.dtype)),
                                                   " != transfer dtype ",
                                                   internal::Av(DTypeName(dtype_))));
  }
  if (s.token_count <= 0 || s.first_token < 0 || s.first_token > token_count_ ||
      s.token_count > token_count_ - s.first_token) {
    return absl::InvalidArgumentError(absl::StrCat("tokens [", s.first_token, ", +", s.token_count,
                                                   ") outside the transfer's ", token_count_));
  }
  if (s.first_token != next_token_[s.layer]) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", s.layer, " slice starts at token ",
                                                   s.first_token, ", expected ",
                                                   next_token_[s.layer]));
  }
  if (s.k == nullptr || s.v == nullptr) {
    return absl::InvalidArgumentError("null K or V buffer");
  }
  next_token_[s.layer] += s.token_count;
  if (next_token_[s.layer] == token_count_) {
    ++layers_complete_;
  }
  return absl::OkStatus();
}

absl::Status SendSequencer::CheckComplete() const {
  if (layers_complete_ != geometry_.num_layers) {
    return absl::FailedPreconditionError(absl::StrCat(
        layers_complete_, " of ", geometry_.num_layers, " layers complete; cannot finish"));
  }
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace tandem
