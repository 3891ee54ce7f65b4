// cortexd [--config FILE] [--foreground] [--check-config] [--print-config] [--version]
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>

#include "cortex/config.h"
#include "cortex/daemon.h"
#include "cortex/env.h"
#include "cortex/log.h"
#include "cortex/paths.h"
#include "cortex/rules.h"
#include "crash_marker.h"
#include "notify.h"

namespace {

pthread_t g_main_thread;
void ForwardToMain(int sig) { pthread_kill(g_main_thread, sig); }

// Forks into the background. The parent returns only once the child reports that it
// is serving (exit 0) or why it could not start (exit 1), so `cortexd && cortexctl ...`
// never races the socket.
int Detach(int* ready_fd) {
  int p[2];
  // Close-on-exec: a plugin host spawned later must not hold the write end, or the
  // parent would wait for an end of file that never comes.
  if (pipe2(p, O_CLOEXEC) != 0) return -1;
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid > 0) {
    close(p[1]);
    std::string msg;
    char buf[512];
    ssize_t n;
    while ((n = read(p[0], buf, sizeof buf)) > 0) msg.append(buf, static_cast<size_t>(n));
    if (msg.rfind("ok ", 0) == 0) {
      // "ok PID LOG": where it logs is the first place to look when something goes wrong.
      const size_t sp = msg.find(' ', 3);
      std::printf("cortexd started (pid %s), log: %s\n", msg.substr(3, sp - 3).c_str(),
                  sp == std::string::npos ? "-" : msg.substr(sp + 1).c_str());
      std::fflush(stdout);  // _exit does not flush, and a pipe's stdout is buffered
      _exit(0);
    }
    std::fprintf(stderr, "cortexd: %s\n", msg.empty() ? "failed to start" : msg.c_str());
    std::fflush(stderr);
    _exit(1);
  }
  close(p[0]);
  setsid();
  // A daemon holds no folder of the shell that started it (paths were made absolute).
  if (chdir("/") != 0) return -1;
  int null = open("/dev/null", O_RDWR);
  if (null >= 0) {
    dup2(null, 0);
    dup2(null, 1);
    dup2(null, 2);
    if (null > 2) close(null);
  }
  *ready_fd = p[1];
  return 0;
}

// Detached, cortexd logs beside its SQLite store, so a config with a store of its own keeps
// its log there too (not in the data folder another daemon may use); else in the data folder.
std::string LogFolder(const cortex::Config& cfg) {
  const std::string& p = cfg.store.path;
  if (cfg.store.url.empty() && !p.empty() && p != ":memory:")
    return std::filesystem::path(p).parent_path().string();
  return cortex::DataDir();
}

void Report(int fd, const std::string& msg) {
  if (fd < 0) return;
  (void)!write(fd, msg.data(), msg.size());
  close(fd);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cortexd: routes tasks to expert plugins and learns which expert to pick"};
  std::string config_path, log_level = "info", log_file;
  bool foreground = false, print_config = false, check_config = false;
  app.add_option("--config", config_path,
                 "YAML config file (default: $XDG_CONFIG_HOME/cortex/cortex.yaml, then "
                 "/etc/cortex/cortex.yaml, else the embedded defaults)");
  app.add_flag("--foreground", foreground, "stay attached and log to stderr");
  app.add_option("--log-level", log_level, "debug, info, warn or error")
      ->check(CLI::IsMember({"debug", "info", "warn", "error"}));
  app.add_option(
      "--log-file", log_file,
      "log file when detached (default: cortexd.log beside a SQLite store, else in DATA_DIR)");
  app.add_flag("--print-config", print_config,
               "print the effective config (defaults filled in) and exit");
  app.add_flag("--check-config", check_config,
               "run every check a start runs (rules, plugins, experts' settings, folders), "
               "report every error, and exit");
  bool version = false;
  app.add_flag("--version", version, "print the version and exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  if (version) {
    std::printf("cortexd %s\n", cortex::CortexVersion());
    return 0;
  }
  // A check reports what is wrong, not every plugin it loaded on the way.
  if (check_config && !app.count("--log-level")) log_level = "warn";
  cortex::SetLogLevel(log_level == "debug"   ? cortex::LogLevel::kDebug
                      : log_level == "warn"  ? cortex::LogLevel::kWarn
                      : log_level == "error" ? cortex::LogLevel::kError
                                             : cortex::LogLevel::kInfo);
  // The file is found and made absolute once: reload re-reads it, after a detached
  // daemon has left the folder it was started in.
  if (config_path.empty()) config_path = cortex::DefaultConfigFile();
  std::error_code ec;
  if (!config_path.empty()) config_path = std::filesystem::absolute(config_path, ec).string();
  if (!log_file.empty()) log_file = std::filesystem::absolute(log_file, ec).string();
  auto fail = [](const cortex::Status& st) {
    // One line per error: a config can have several.
    for (const std::string& l : cortex::SplitLines(st.message()))
      std::fprintf(stderr, "cortexd: %s\n", l.c_str());
    return 1;
  };
  cortex::DaemonOptions opts;
  opts.config_path = config_path;
  if (check_config) {
    // Errors in the file do not stop the check: what parsed goes on to every later check
    // (rules, plugins, experts, folders), so one run reports them all.
    std::vector<std::string> warnings;
    cortex::Status st = cortex::CheckConfigFile(config_path, opts, &warnings);
    for (const auto& w : warnings) std::fprintf(stderr, "cortexd: warning: %s\n", w.c_str());
    if (!st.ok()) return fail(st);
    std::printf("%s: ok\n", config_path.empty() ? "<embedded defaults>" : config_path.c_str());
    return 0;
  }
  cortex::Result<cortex::Config> cfg = config_path.empty()
                                           ? cortex::Result<cortex::Config>(cortex::DefaultConfig())
                                           : cortex::LoadConfigFile(config_path);
  // A start stops at its first error; the user is shown every one, as --check-config would.
  if (!cfg.ok()) return fail(cortex::EveryConfigError(cfg.status(), config_path, opts));
  if (print_config) {
    if (cortex::Status st = cortex::FillExpertDefaults(opts, &cfg.value()); !st.ok())
      return fail(cortex::EveryConfigError(st, config_path, opts));
    std::fputs(cortex::ConfigToYaml(cfg.value()).c_str(), stdout);
    return 0;
  }

  int ready_fd = -1;
  std::string log_shown;  // what the start line says of the log: its path, or why none
  if (!foreground) {
    if (Detach(&ready_fd) != 0) {
      std::perror("cortexd: fork");
      return 1;
    }
    cortex::Status folder;  // whether the log may be written where it is to go
    if (log_file.empty()) {
      // Beside the store when its folder passes the private-folder check (checked, never
      // tightened: it may be a home); else in the data folder, cortexd's own, made private.
      cortex::Env* env = cortex::Env::Default();
      std::string dir = LogFolder(cfg.value());
      if (dir != cortex::DataDir() && !env->MakePrivateDir(dir, false).ok())
        dir = cortex::DataDir();
      log_file = dir + "/cortexd.log";
      if (dir == cortex::DataDir()) folder = env->MakePrivateDir(dir, true);
    }
    // Only a regular file of ours, never another user's file or a FIFO planted there.
    if (folder.ok()) folder = cortex::Env::Default()->MakePrivateFile(log_file);
    if (!folder.ok()) {
      log_shown = "none (" + folder.message() + ")";
    } else if (cortex::SetLogFile(log_file)) {
      log_shown = log_file;
      // stderr too, so what plugin hosts (and anything else) print lands in the log.
      int fd = open(log_file.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
      if (fd >= 0) {
        dup2(fd, 2);
        close(fd);
      }
    } else {
      log_shown = "none (cannot open " + log_file + ": " + std::strerror(errno) + ")";
    }
  }

  // Signals are taken synchronously by the main loop (signalfd); every thread started
  // from here on inherits the mask. Broken pipes surface as write errors instead.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);
  // Past a file-size limit a write fails (and is retried) instead of killing cortexd.
  signal(SIGXFSZ, SIG_IGN);
  // A crash is written down so the next start can tell it from a kill (poison-task guard).
  cortex::InstallCrashHandlers();
  // Threads that libraries started before main (OpenBLAS's pool) do not have the mask; a
  // signal the kernel hands to one of them is passed on to the main thread, where it stays
  // pending for the signalfd instead of killing the process.
  g_main_thread = pthread_self();
  struct sigaction sa = {};
  sa.sa_handler = ForwardToMain;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGTERM, SIGINT, SIGHUP}) sigaction(sig, &sa, nullptr);

  auto d = cortex::Daemon::Create(std::move(cfg).value(), opts);
  cortex::Status st = d.ok() ? d.value()->Start() : d.status();
  if (!st.ok()) {
    st = cortex::EveryConfigError(st, config_path, opts);
    cortex::LogLines(cortex::LogLevel::kError, "cannot start: " + st.message());
    Report(ready_fd, st.message());
    return 1;
  }
  Report(ready_fd, "ok " + std::to_string(getpid()) + " " + log_shown);
  cortex::NotifyReady();  // Type=notify: serving now
  st = d.value()->Run();
  if (!st.ok()) {
    cortex::LogError("{}", st.ToString());
    return 1;
  }
  return 0;
}
