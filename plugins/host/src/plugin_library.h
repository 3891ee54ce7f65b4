// A plugin .so loaded into *this* process with Boost.DLL and checked (entry point, ABI
// version, complete table, valid manifest), and one execution of its instance with
// owned inputs and bounded output. The plugin host process uses these always; cortexd
// only in the opt-in in-process mode (plugins.isolation: in-process).
#pragma once

#include <atomic>
#include <boost/dll/shared_library.hpp>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cortex/experts.h"
#include "cortex/plugin.h"
#include "cortex/status.h"
#include "cortex/types.h"

namespace cortex {

class PluginLibrary {
 public:
  // Loads `load_path` (a private copy); messages name `display_path`, the user's file.
  static Status Open(const std::string& load_path, const std::string& display_path,
                     std::unique_ptr<PluginLibrary>* out);
  const cortex_plugin_api* api() const { return api_; }
  const Manifest& manifest() const { return manifest_; }

 private:
  boost::dll::shared_library lib_;
  const cortex_plugin_api* api_ = nullptr;
  Manifest manifest_;
};

// One call of execute(): the task as the plugin sees it (owned here, so it outlives an
// abandoned wait), its cancel flag and its output, kept to kMaxExpertOutputBytes.
class Execution {
 public:
  Execution(const Task& task, int64_t deadline_unix_ms);
  Execution(const Execution&) = delete;
  Execution& operator=(const Execution&) = delete;

  // Calls the plugin (blocks until it returns) and converts what it returned.
  void Run(const cortex_plugin_api* api, void* instance);
  void Cancel() { cancelled_ = 1; }
  // Valid after Run: kind, quality (defaulted), error; `output` is the bounded text.
  Outcome TakeOutcome();

 private:
  static int CancelledCb(void* ctx);
  static void WriteCb(void* ctx, const char* data, size_t len);

  std::string id_, text_;
  std::vector<std::string> keys_, values_;
  std::vector<cortex_tag> tags_;
  cortex_task task_{};
  cortex_host host_{};
  std::atomic<int> cancelled_{0};
  std::mutex mu_;  // output: the plugin may write from several threads
  std::string output_;
  bool truncated_ = false;
  Outcome outcome_;
};

}  // namespace cortex
