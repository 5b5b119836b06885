// Mapping between the API messages and the engine/kvcache types, and the one place where
// absl::Status codes become gRPC statuses. Shared by the router and both workers.
#pragma once

#include <grpcpp/support/status.h>

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "engine/engine.h"
#include "kvcache/kv_store.h"
#include "tandem/internal/v1/worker.pb.h"
#include "tandem/v1/tandem.pb.h"

namespace tandem {

// Copies the fields that are set; unset fields stay unset (model defaults apply). Does not
// validate (ValidateSamplingParams does).
SamplingParams SamplingFromProto(const v1::SamplingParams& p);
void SamplingToProto(const SamplingParams& p, v1::SamplingParams* out);

// SequenceSpec -> engine request (prompt, outputs, sampling).
SequenceRequest SequenceFromProto(const internal::v1::SequenceSpec& spec);

void KvLayoutToProto(const KvStoreLayout& layout, internal::v1::KvLayout* out);
// INVALID_ARGUMENT on an unknown dtype or a non-positive dimension.
absl::Status KvGeometryFromProto(const internal::v1::KvLayout& p, KvGeometry* geometry,
                                 DType* dtype);

void TokenEventToProto(const TokenEvent& ev, internal::v1::GeneratedToken* out);

// absl -> gRPC, code for code; the message is ours (never a dependency's status verbatim: the
// caller words it). RESOURCE_EXHAUSTED carries a retry pushback hint in the trailing metadata
// when used through ToGrpcStatus's caller.
grpc::Status ToGrpcStatus(const absl::Status& s);
absl::Status FromGrpcStatus(const grpc::Status& s);

std::string FingerprintHex(uint64_t fingerprint);

}  // namespace tandem
