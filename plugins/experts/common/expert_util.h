// Helpers shared by the bundled experts (linked statically into each plugin).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cortex/plugin.h"

namespace cortex::experts {

struct ProcessSpec {
  std::vector<std::string> argv;  // argv[0] is looked up in PATH; never a shell
  std::vector<std::string> env;   // complete environment, "KEY=VALUE"
  std::string cwd;                // empty: inherit
  std::string stdin_data;
  int64_t deadline_ms = 0;  // unix ms; 0: none
  std::function<bool()> cancelled;
  size_t max_output = 64 << 10;  // per stream; the rest is drained and dropped
};

struct ProcessResult {
  bool started = false;
  std::string error;  // why it could not start, or how it was stopped
  bool timed_out = false;
  bool cancelled = false;
  int exit_code = -1;  // when it exited
  int signal = 0;      // when a signal ended it
  std::string out, err;
  bool truncated = false;
};

// Runs a program in its own process group; at the deadline or on cancellation the
// group gets SIGTERM, then SIGKILL one second later.
ProcessResult RunProcess(const ProcessSpec& spec);

// The files of a repository, relative to `root`: those git tracks when `root` is a git
// checkout (so build output and ignored files are skipped), otherwise every regular file
// except under .git. `how` says which. Returns false with `error` set on failure.
bool ListRepoFiles(const std::string& root, size_t max_files,
                   const std::function<bool()>& cancelled, std::vector<std::string>* files,
                   std::string* how, std::string* error);

// What a repository expert works on: the task's tag repo=PATH and the files in it.
struct TaskRepo {
  std::string path;
  std::vector<std::string> files;
  std::string how;  // "git ls-files" or "directory walk"
};

// Fills `repo` from the task. Returns false with `*stop` set when the expert cannot go
// on: rejected without the tag (another expert may do the task), failure when the path
// cannot be listed.
bool ListTaskRepo(const cortex_task& task, const cortex_host& host, size_t max_files,
                  TaskRepo* repo, cortex_result* stop);

int64_t NowUnixMs();
std::string SignalName(int sig);

}  // namespace cortex::experts
