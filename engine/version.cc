// Tandem's version string.
#include "engine/version.h"

namespace tandem {
const char* Version() { return "0.1.0"; }
}  // namespace tandem
