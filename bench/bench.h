// Internal to cortex-bench: the subcommands that live in their own files.
#pragma once

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "cortex/learner.h"

namespace cortex::bench {

inline void WriteJson(const std::string& path, const nlohmann::json& j) {
  if (path.empty()) return;
  std::ofstream(path) << j.dump(2) << "\n";
}

struct ReplayOptions {
  std::string corpus;
  std::string late_expert;
  double late_at = 0.5;
  std::string config;
  std::string json_out;
  uint64_t seed = 1;
  bool verbose = false;
  LearnerOptions learner;
};

int Replay(const ReplayOptions& opt);

}  // namespace cortex::bench
