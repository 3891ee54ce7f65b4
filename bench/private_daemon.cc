// A cortexd of cortex-bench's own, in a private temporary folder (its own store, socket
// and plugin folder with the misbehave expert), so a measurement never writes into the
// user's audit log or competes with the user's daemon.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>

#include "bench.h"
#include "cortex/client.h"

namespace cortex::bench {

namespace fs = std::filesystem;

PrivateDaemon::~PrivateDaemon() {
  if (pid > 0) Stop();
  std::error_code ec;
  if (!dir.empty()) fs::remove_all(dir, ec);
}

bool PrivateDaemon::Start(const std::string& cortexd_path, const std::string& daemon_opts,
                          const std::string& plugin_opts, const std::string& rest,
                          const std::string& base) {
  std::string tmpl = base + "/cortex-bench-XXXXXX";
  if (!mkdtemp(tmpl.data())) return std::perror("cortex-bench: mkdtemp"), false;
  dir = tmpl;
  fs::create_directories(dir / "plugins");
  fs::permissions(dir / "plugins", fs::perms::owner_all, fs::perm_options::replace);
  socket = (dir / "run/cortexd.sock").string();
  const fs::path exe_dir = fs::read_symlink("/proc/self/exe").parent_path();
  const fs::path plugin = exe_dir.parent_path() / "lib/cortex/bench-plugins/misbehave.so";
  std::error_code ec;
  fs::copy_file(plugin, dir / "plugins/misbehave.so", ec);
  if (ec) {
    std::fprintf(stderr, "cortex-bench: cannot copy %s: %s\n", plugin.c_str(),
                 ec.message().c_str());
    return false;
  }
  fs::permissions(dir / "plugins/misbehave.so", fs::perms(0755), fs::perm_options::replace);
  std::ofstream(dir / "cortex.yaml")
      << "daemon: {socket: " << socket << ", " << daemon_opts << "}\nstore: {"
      << (!store_url.empty()    ? "url: '" + store_url + "'"
          : !store_path.empty() ? "path: " + store_path
                                : "path: " + (dir / "data/cortex.db").string())
      << "}\nplugins: {dir: " << (dir / "plugins").string() << ", bundled: false, " << plugin_opts
      << "}\n"
      << rest;
  const std::string cortexd = cortexd_path.empty() ? (exe_dir / "cortexd").string() : cortexd_path;
  pid = fork();
  if (pid == 0) {
    FILE* f = freopen((dir / "cortexd.log").c_str(), "w", stderr);
    (void)f;
    execl(cortexd.c_str(), cortexd.c_str(), "--foreground", "--config",
          (dir / "cortex.yaml").c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  for (int i = 0; i < static_cast<int>(start_timeout_s * 20); ++i) {
    Client c;
    nlohmann::json r;
    if (c.Connect(socket).ok() && c.Call({{"op", "status"}}, &r).ok()) return true;
    usleep(50000);
  }
  std::fprintf(stderr, "cortex-bench: cortexd did not start (log: %s)\n",
               (dir / "cortexd.log").c_str());
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  pid = -1;
  return false;
}

int PrivateDaemon::Stop() {
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  pid = -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace cortex::bench
