// Process identity shared by both worker roles: incarnation ids and the WorkerInfo/WorkerLoad
// messages built from an engine.
#pragma once

#include <cstdint>
#include <string>

#include "engine/engine.h"
#include "tandem/internal/v1/worker.pb.h"

namespace tandem {

// A fresh random non-zero id (a restarted process is a new worker, DESIGN §9).
uint64_t NewIncarnationId();

// backend "cpu" -> vendor "cpu", "cuda" -> "nvidia", "hip" -> "amd".
std::string AcceleratorVendor(const std::string& backend);

void EngineLoadToProto(const EngineLoad& load, internal::v1::WorkerLoad* out);

}  // namespace tandem
