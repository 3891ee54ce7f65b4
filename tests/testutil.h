// Helpers for tests that run the real binaries: temp folders, running cortexctl, and a
// cortexd child process with its own config, socket, store and plugin folder.
#pragma once

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../plugins/experts/common/expert_util.h"

namespace cortex::test {

namespace fs = std::filesystem;
using json = nlohmann::json;

inline std::string BinDir() { return CORTEX_TEST_BIN_DIR; }
inline std::string BundledDir() { return CORTEX_TEST_BUNDLED_DIR; }
inline std::string TestPluginDir() { return CORTEX_TEST_PLUGIN_DIR; }
inline std::string BenchPluginDir() { return CORTEX_TEST_BENCH_PLUGIN_DIR; }
inline std::string HostExe() { return CORTEX_TEST_HOST_EXE; }

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/cortex-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& rel) const { return path_ + "/" + rel; }

 private:
  std::string path_;
};

struct Run {
  int code = -1;
  std::string out, err;
  json Json() const { return json::parse(out, nullptr, false); }
};

inline std::vector<std::string> BaseEnv() {
  std::vector<std::string> env = {"PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"};
  if (const char* h = getenv("HOME")) env.push_back(std::string("HOME=") + h);
  return env;
}

inline Run RunCmd(const std::vector<std::string>& argv, double timeout_s = 60,
                  const std::string& stdin_data = "", std::vector<std::string> env = BaseEnv(),
                  const std::string& cwd = "") {
  experts::ProcessSpec spec;
  spec.argv = argv;
  spec.cwd = cwd;
  spec.env = std::move(env);
  spec.stdin_data = stdin_data;
  spec.deadline_ms = experts::NowUnixMs() + static_cast<int64_t>(timeout_s * 1000);
  spec.max_output = 16 << 20;
  experts::ProcessResult r = experts::RunProcess(spec);
  Run out;
  out.code = r.started && !r.timed_out ? (r.signal ? 128 + r.signal : r.exit_code) : -1;
  out.out = r.out;
  out.err = r.err;
  return out;
}

inline Run Ctl(const std::string& socket, std::vector<std::string> args, double timeout_s = 60,
               const std::string& bin_dir = BinDir()) {
  std::vector<std::string> argv = {bin_dir + "/cortexctl", "--socket", socket};
  argv.insert(argv.end(), args.begin(), args.end());
  // From "/", outside any git work tree: the build folder is inside one, and submit would
  // add its repo= tag (tests that want that run cortexctl from a repository themselves).
  return RunCmd(argv, timeout_s, "", BaseEnv(), "/");
}

inline void WriteFile(const std::string& path, const std::string& content) {
  fs::create_directories(fs::path(path).parent_path());
  FILE* f = fopen(path.c_str(), "wb");
  fwrite(content.data(), 1, content.size(), f);
  fclose(f);
}

inline std::string ReadFile(const std::string& path) {
  std::string s;
  if (FILE* f = fopen(path.c_str(), "rb")) {
    char buf[8192];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
    fclose(f);
  }
  return s;
}

// Polls `pred` every 50 ms for up to `timeout_s`. Tests wait for the state they need
// rather than sleeping a guessed time; the bound only ends a wait that would never
// succeed, so it is generous (sanitizers and a loaded machine are many times slower).
template <class F>
bool Eventually(F pred, double timeout_s = 30) {
  auto deadline = experts::NowUnixMs() + static_cast<int64_t>(timeout_s * 1000);
  while (experts::NowUnixMs() < deadline) {
    if (pred()) return true;
    usleep(50000);
  }
  return pred();
}

// A cortexd child process in --foreground mode with stderr captured to `log`.
class Daemon {
 public:
  // `extra_yaml` is appended to a config that sets socket, store and plugin folder under
  // `dir` and turns exploration off so routing is deterministic.
  Daemon(const TempDir& dir, const std::string& extra_yaml = "",
         const std::string& router_yaml =
             "router: {exploration: 0, seed: 1}\ntraining: {online: false}\n",
         bool bundled = true, const std::string& plugins_extra = "")
      : socket(dir / "run/cortexd.sock"),
        store(dir / "data/cortex.db"),
        plugin_dir(dir / "plugins"),
        config(dir / "cortex.yaml"),
        log(dir / "cortexd.log") {
    fs::create_directories(plugin_dir);
    fs::permissions(plugin_dir, fs::perms::owner_all, fs::perm_options::replace);
    WriteFile(config, "daemon: {socket: " + socket +
                          ", workers: 4, shutdown_grace: 2s}\nstore: {path: " + store +
                          "}\nplugins: {dir: " + plugin_dir +
                          ", bundled: " + (bundled ? "true" : "false") + plugins_extra + "}\n" +
                          router_yaml + extra_yaml);
  }
  // Uses the PostgreSQL database `url` (store.url) instead of the SQLite file; before Start.
  void UseStoreUrl(const std::string& url) {
    std::string c = ReadFile(config);
    const std::string was = "store: {path: " + store + "}";
    c.replace(c.find(was), was.size(), "store: {url: '" + url + "'}");
    WriteFile(config, c);
    store = url;
  }
  ~Daemon() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }

  // Starts cortexd and waits until its socket answers (or it exits). The bound is only a
  // backstop for a hung start: a sanitized build on a loaded machine is slow to come up.
  bool Start(double timeout_s = 60) {
    std::string cmd = bin_dir + "/cortexd";
    pid = fork();
    if (pid == 0) {
      FILE* f = freopen(log.c_str(), "a", stderr);
      (void)f;
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      struct rlimit no_core = {0, 0};  // tests crash cortexd on purpose: no core files
      setrlimit(RLIMIT_CORE, &no_core);
      execl(cmd.c_str(), cmd.c_str(), "--foreground", "--config", config.c_str(), (char*)nullptr);
      _exit(127);
    }
    auto deadline = experts::NowUnixMs() + static_cast<int64_t>(timeout_s * 1000);
    while (experts::NowUnixMs() < deadline) {
      int st;
      if (waitpid(pid, &st, WNOHANG) == pid) {
        exit_status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        pid = -1;
        return false;
      }
      // Our own daemon must answer: another one may hold the same socket.
      Run r = Ctl({"status", "--json"});
      if (r.code == 0 && r.Json().value("pid", -1) == pid) return true;
      usleep(20000);
    }
    return false;
  }
  // Sends `sig` and waits for the exit status.
  int Stop(int sig = SIGTERM, double timeout_s = 20) {
    if (pid <= 0) return exit_status;
    kill(pid, sig);
    auto deadline = experts::NowUnixMs() + static_cast<int64_t>(timeout_s * 1000);
    int st = 0;
    while (waitpid(pid, &st, WNOHANG) != pid) {
      if (experts::NowUnixMs() > deadline) {
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
        break;
      }
      usleep(10000);
    }
    pid = -1;
    exit_status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return exit_status;
  }
  bool Alive() const { return pid > 0 && kill(pid, 0) == 0; }
  Run Ctl(std::vector<std::string> args, double timeout_s = 60) const {
    return test::Ctl(socket, std::move(args), timeout_s, bin_dir);
  }
  json CtlJson(std::vector<std::string> args) const {
    args.push_back("--json");
    return Ctl(args).Json();
  }
  // Waits until `status --json` satisfies `pred` (e.g. work running and queued).
  template <class F>
  bool WaitStatus(F pred, double timeout_s = 30) const {
    return Eventually(
        [&] {
          json st = CtlJson({"status"});
          return st.is_object() && pred(st);
        },
        timeout_s);
  }
  std::string Log() const { return ReadFile(log); }
  // Puts a copy of the plugin file `so` in the plugin folder, as its owner would (0755).
  void AddPlugin(const std::string& so) const {
    const std::string to = plugin_dir + "/" + fs::path(so).filename().string();
    fs::copy_file(so, to, fs::copy_options::overwrite_existing);
    fs::permissions(to, fs::perms(0755), fs::perm_options::replace);
  }

  std::string socket, store, plugin_dir, config, log;
  std::string bin_dir = BinDir();  // where cortexd and cortexctl are: another install's bin/
  pid_t pid = -1;
  int exit_status = -1;
};

}  // namespace cortex::test
