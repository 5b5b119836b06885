// API message conversions: see convert.h.
#include "proto/convert.h"

#include <cstdio>

namespace tandem {

SamplingParams SamplingFromProto(const v1::SamplingParams& p) {
  SamplingParams s;
  if (p.has_max_tokens()) s.max_tokens = p.max_tokens();
  if (p.has_temperature()) s.temperature = p.temperature();
  if (p.has_top_p()) s.top_p = p.top_p();
  if (p.has_top_k()) s.top_k = p.top_k();
  if (p.has_min_p()) s.min_p = p.min_p();
  if (p.has_repetition_penalty()) s.repetition_penalty = p.repetition_penalty();
  if (p.has_presence_penalty()) s.presence_penalty = p.presence_penalty();
  if (p.has_frequency_penalty()) s.frequency_penalty = p.frequency_penalty();
  if (p.has_seed()) s.seed = p.seed();
  s.stop.assign(p.stop().begin(), p.stop().end());
  s.stop_token_ids.assign(p.stop_token_ids().begin(), p.stop_token_ids().end());
  if (p.has_min_tokens()) s.min_tokens = p.min_tokens();
  if (p.has_ignore_eos()) s.ignore_eos = p.ignore_eos();
  if (p.has_logprobs()) s.logprobs = p.logprobs();
  return s;
}

void SamplingToProto(const SamplingParams& s, v1::SamplingParams* p) {
  p->Clear();
  p->set_max_tokens(s.max_tokens);
  if (s.temperature) p->set_temperature(*s.temperature);
  if (s.top_p) p->set_top_p(*s.top_p);
  if (s.top_k) p->set_top_k(*s.top_k);
  if (s.min_p) p->set_min_p(*s.min_p);
  if (s.repetition_penalty) p->set_repetition_penalty(*s.repetition_penalty);
  if (s.presence_penalty != 0.0f) p->set_presence_penalty(s.presence_penalty);
  if (s.frequency_penalty != 0.0f) p->set_frequency_penalty(s.frequency_penalty);
  if (s.seed) p->set_seed(*s.seed);
  for (const std::string& stop : s.stop) p->add_stop(stop);
  for (int32_t id : s.stop_token_ids) p->add_stop_token_ids(id);
  if (s.min_tokens != 0) p->set_min_tokens(s.min_tokens);
  if (s.ignore_eos) p->set_ignore_eos(true);
  if (s.logprobs >= 0) p->set_logprobs(s.logprobs);
}

SequenceRequest SequenceFromProto(const internal::v1::SequenceSpec& spec) {
  SequenceRequest r;
  r.prompt_ids.assign(spec.prompt_ids().begin(), spec.prompt_ids().end());
  r.output_ids.assign(spec.output_ids().begin(), spec.output_ids().end());
  r.sampling = SamplingFromProto(spec.sampling());
  return r;
}

void KvLayoutToProto(const KvStoreLayout& layout, internal::v1::KvLayout* out) {
  out->set_num_layers(layout.geometry.num_layers);
  out->set_num_kv_heads(layout.geometry.num_kv_heads);
  out->set_head_dim(layout.geometry.head_dim);
  out->set_dtype(std::string(DTypeName(layout.dtype)));
  out->set_block_size(layout.block_size);
}

absl::Status KvGeometryFromProto(const internal::v1::KvLayout& p, KvGeometry* geometry,
                                 DType* dtype) {
  if (p.num_layers() <= 0 || p.num_kv_heads() <= 0 || p.head_dim() <= 0) {
    return absl::InvalidArgumentError("kv layout: layers, kv heads and head dim must be positive");
  }
  const auto d = ParseDType(p.dtype());
  if (!d) {
    return absl::InvalidArgumentError("kv layout: unknown dtype '" + p.dtype() + "'");
  }
  *geometry = KvGeometry{p.num_layers(), p.num_kv_heads(), p.head_dim()};
  *dtype = *d;
  return absl::OkStatus();
}

void TokenEventToProto(const TokenEvent& ev, internal::v1::GeneratedToken* out) {
  out->set_index(ev.index);
  out->set_id(ev.token);
  out->set_logprob(ev.logprob);
  for (const auto& [id, lp] : ev.top_logprobs) {
    auto* t = out->add_top();
    t->set_token_id(id);
    t->set_logprob(lp);
  }
  out->set_finish_reason(FinishReasonName(ev.finish));
}

grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) {
    return grpc::Status::OK;
  }
  // absl and gRPC share the canonical code numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(static_cast<int>(s.code())),
                      std::string(s.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) {
    return absl::OkStatus();
  }
  return absl::Status(static_cast<absl::StatusCode>(static_cast<int>(s.error_code())),
                      s.error_message());
}

std::string FingerprintHex(uint64_t fingerprint) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(fingerprint));
  return buf;
}

}  // namespace tandem
