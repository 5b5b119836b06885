// Bridges std::string_view into Abseil string helpers: Debian's Abseil (20220623) has its own
// absl::string_view, so absl::StrCat does not take std::string_view directly.
#pragma once

#include <string_view>

#include "absl/strings/string_view.h"

namespace tandem::internal {

inline absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

}  // namespace tandem::internal
