// Shared helpers of the engine tests: paths of the test data and reading golden JSON.
#pragma once

#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

namespace tandem::testing_util {

inline std::string TestData(const std::string& rel) {
  return std::string(TANDEM_TEST_DATA_DIR) + "/" + rel;
}

inline std::string DemoModelDir() { return TANDEM_DEMO_MODEL_DIR; }

inline nlohmann::json ReadJson(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return nlohmann::json::parse(ss.str());
}

}  // namespace tandem::testing_util
