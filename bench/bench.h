// Internal to cortex-bench: the subcommands that live in their own files.
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cortex/learner.h"

namespace cortex::bench {

// The value at fraction `p` of the sorted samples (nearest rank).
inline double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1,
                    static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5))];
}

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
  std::string html_out;  // the learning curve as a page (cli/src/pages/replay.js)
  uint64_t seed = 1;
  bool verbose = false;
  int max_attempts = 0;  // attempts per task (fallbacks); 0: router.max_attempts
  LearnerOptions learner;
};

int Replay(const ReplayOptions& opt);

struct SpeedOptions {
  std::string backend = "cpu";
  int experts = 16;
  int batch = 1024;
  std::vector<int> batches;  // several batch sizes in one run
  int min_tasks = 200000;    // per batch size, for the scoring figure
  int examples = 100000;     // training
  int epochs = 2;
  int population = 0;  // train: also fit this many candidates as a retrain's population does
  std::string json_out;
};

int Score(const SpeedOptions& opt);

// A cortexd of the tool's own in a temporary folder: its socket, store (on disk, fsync
// on) and plugin folder (holding misbehave.so, no bundled experts) are there; the
// `daemon:` and `plugins:` options given are added to those, `rest` (router, experts...)
// follows. Stopped and removed with the object.
struct PrivateDaemon {
  std::filesystem::path dir;
  std::string socket;
  std::string store_url;        // set before Start: a node of the cluster on this database
  std::string store_path;       // set before Start: this SQLite store instead of a new one
  double start_timeout_s = 10;  // how long Start waits for it to answer
  pid_t pid = -1;
  PrivateDaemon() = default;
  PrivateDaemon(const PrivateDaemon&) = delete;
  PrivateDaemon& operator=(const PrivateDaemon&) = delete;
  ~PrivateDaemon();
  // `base`: the folder its temporary folder is made in (/dev/shm puts the store on tmpfs).
  bool Start(const std::string& cortexd, const std::string& daemon_opts,
             const std::string& plugin_opts, const std::string& rest,
             const std::string& base = "/tmp");
  int Stop();  // SIGTERM; its exit status
};

struct ExplainOptions {
  long outcomes = 1000000;
  long checkpoint_every = 3000;
  std::string corpus;  // task texts (TSV, text last); default: the shipped sample
  std::string cortexd;
  std::string json_out;
};

int Explain(const ExplainOptions& opt);

struct SoakOptions {
  int clients = 8;
  double seconds = 30;
  std::string cortexd;  // default: the cortexd beside cortex-bench
  std::string json_out;
};

int Soak(const SoakOptions& opt);
int Train(const SpeedOptions& opt);

}  // namespace cortex::bench
