// Tandem's version, as printed by `tandem --version` and reported to the router.
#pragma once

namespace tandem {
const char* Version();
}  // namespace tandem
