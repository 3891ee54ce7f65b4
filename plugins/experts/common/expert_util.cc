#include "expert_util.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <string_view>

#include "process_tree.h"

namespace cortex::experts {

namespace fs = std::filesystem;

int64_t NowUnixMs() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

std::string SignalName(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  return abbrev ? std::string("SIG") + abbrev : "signal " + std::to_string(sig);
}

namespace {

// Stops a program with everything it started: its process group, and its descendants
// that moved to groups of their own (`set -m`, a daemonising child).
void StopProgram(pid_t pid, int sig) {
  kill(-pid, sig);
  SignalDescendants(pid, sig);
}

// Writing to a child that stopped reading raises SIGPIPE; a plugin must not rely on its
// host ignoring it, so this thread blocks it while a process runs and drops any pending.
class ScopedBlockSigpipe {
 public:
  ScopedBlockSigpipe() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
  }
  ~ScopedBlockSigpipe() {
    struct timespec zero = {0, 0};
    while (sigtimedwait(&pipe_, nullptr, &zero) > 0) {
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }

 private:
  sigset_t pipe_, old_;
};
}  // namespace

ProcessResult RunProcess(const ProcessSpec& spec) {
  ScopedBlockSigpipe no_sigpipe;
  ProcessResult r;
  if (spec.argv.empty()) {
    r.error = "empty command";
    return r;
  }
  // A spawn that fails to change folder reports ENOENT like a missing program: say which.
  if (!spec.cwd.empty()) {
    struct stat st;
    if (stat(spec.cwd.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) ||
        faccessat(AT_FDCWD, spec.cwd.c_str(), X_OK, AT_EACCESS) != 0) {
      const int e = errno;
      r.error = "cannot run in folder " + spec.cwd + ": ";
      r.error += stat(spec.cwd.c_str(), &st) != 0 ? std::strerror(errno)
                 : !S_ISDIR(st.st_mode)           ? "not a folder"
                                                  : std::strerror(e);
      return r;
    }
  }
  int in[2], out[2], err[2];
  if (pipe2(in, O_CLOEXEC) != 0) {
    r.error = std::string("pipe: ") + std::strerror(errno);
    return r;
  }
  if (pipe2(out, O_CLOEXEC) != 0) {
    close(in[0]), close(in[1]);
    r.error = std::string("pipe: ") + std::strerror(errno);
    return r;
  }
  if (pipe2(err, O_CLOEXEC) != 0) {
    close(in[0]), close(in[1]), close(out[0]), close(out[1]);
    r.error = std::string("pipe: ") + std::strerror(errno);
    return r;
  }

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, in[0], 0);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_adddup2(&fa, err[1], 2);
  if (!spec.cwd.empty()) posix_spawn_file_actions_addchdir_np(&fa, spec.cwd.c_str());
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // The daemon blocks and ignores signals for its own use; the child starts clean.
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setflags(&attr,
                           POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);

  std::vector<char*> argv, envp;
  for (const auto& a : spec.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const auto& e : spec.env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);

  pid_t pid = -1;
  int rc = posix_spawnp(&pid, argv[0], &fa, &attr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(in[0]), close(out[1]), close(err[1]);
  if (rc != 0) {
    close(in[1]), close(out[0]), close(err[0]);
    r.error = "cannot run " + spec.argv[0] + ": " + std::strerror(rc);
    return r;
  }
  r.started = true;

  fcntl(in[1], F_SETFL, O_NONBLOCK);
  size_t written = 0;
  int in_fd = in[1];
  if (spec.stdin_data.empty()) {
    close(in_fd);
    in_fd = -1;
  }
  int fds[2] = {out[0], err[0]};
  std::string* bufs[2] = {&r.out, &r.err};
  bool open_fd[2] = {true, true};
  int64_t kill_at = 0;  // when SIGKILL follows the SIGTERM
  bool term_sent = false;
  char buf[8192];
  while (open_fd[0] || open_fd[1]) {
    int64_t now = NowUnixMs();
    bool stop_now = false;
    if (!term_sent) {
      if (spec.deadline_ms && now >= spec.deadline_ms)
        r.timed_out = stop_now = true;
      else if (spec.cancelled && spec.cancelled())
        r.cancelled = stop_now = true;
    }
    if (stop_now) {
      StopProgram(pid, SIGTERM);
      term_sent = true;
      kill_at = now + 1000;
    }
    if (term_sent && now >= kill_at) {
      StopProgram(pid, SIGKILL);
      kill_at = now + 1000000;  // once
    }
    struct pollfd p[3];
    int n = 0;
    int map[3];
    for (int i = 0; i < 2; ++i)
      if (open_fd[i]) p[n] = {fds[i], POLLIN, 0}, map[n++] = i;
    if (in_fd >= 0) p[n] = {in_fd, POLLOUT, 0}, map[n++] = 2;
    int pr = poll(p, static_cast<nfds_t>(n), 100);
    if (pr < 0 && errno != EINTR) break;
    for (int k = 0; k < n && pr > 0; ++k) {
      if (!p[k].revents) continue;
      if (map[k] == 2) {
        ssize_t w =
            write(in_fd, spec.stdin_data.data() + written, spec.stdin_data.size() - written);
        if (w > 0) written += static_cast<size_t>(w);
        if (w < 0 && errno != EAGAIN) written = spec.stdin_data.size();  // EPIPE: it won't read
        if (written >= spec.stdin_data.size()) {
          close(in_fd);
          in_fd = -1;
        }
        continue;
      }
      int i = map[k];
      ssize_t got = read(fds[i], buf, sizeof buf);
      if (got > 0) {
        size_t room = spec.max_output - std::min(spec.max_output, bufs[i]->size());
        bufs[i]->append(buf, std::min(room, static_cast<size_t>(got)));
        if (static_cast<size_t>(got) > room) r.truncated = true;
      } else if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
        open_fd[i] = false;
      }
    }
  }
  if (in_fd >= 0) close(in_fd);
  close(out[0]), close(err[0]);
  // Output closed; the child may still run (it closed its stdout): keep enforcing limits.
  int status = 0;
  for (;;) {
    pid_t w = waitpid(pid, &status, WNOHANG);
    if (w == pid) break;
    if (w < 0 && errno != EINTR) break;
    int64_t now = NowUnixMs();
    if (!term_sent &&
        ((spec.deadline_ms && now >= spec.deadline_ms) || (spec.cancelled && spec.cancelled()))) {
      (spec.deadline_ms && now >= spec.deadline_ms ? r.timed_out : r.cancelled) = true;
      StopProgram(pid, SIGTERM);
      term_sent = true;
      kill_at = now + 1000;
    }
    if (term_sent && now >= kill_at) {
      StopProgram(pid, SIGKILL);
      kill_at = now + 1000000;
    }
    usleep(5000);
  }
  if (WIFEXITED(status))
    r.exit_code = WEXITSTATUS(status);
  else if (WIFSIGNALED(status))
    r.signal = WTERMSIG(status);
  return r;
}

bool ListRepoFiles(const std::string& root, size_t max_files,
                   const std::function<bool()>& cancelled, std::vector<std::string>* files,
                   std::string* how, std::string* error) {
  files->clear();
  std::error_code ec;
  if (!fs::is_directory(root, ec)) {
    *error = "repo " + root + " is not a directory";
    return false;
  }
  if (fs::exists(fs::path(root) / ".git", ec)) {
    ProcessSpec spec;
    spec.argv = {"git", "-C", root, "ls-files", "-z", "--cached"};
    spec.env = {"PATH=/usr/local/bin:/usr/bin:/bin", "LC_ALL=C", "GIT_CONFIG_NOSYSTEM=1",
                "HOME=/nonexistent"};
    spec.deadline_ms = NowUnixMs() + 30000;
    spec.cancelled = cancelled;
    spec.max_output = 64 << 20;
    ProcessResult r = RunProcess(spec);
    // A checkout with nothing committed yet lists no files: walk it instead.
    if (r.started && r.exit_code == 0 && !r.truncated && !r.out.empty()) {
      size_t start = 0;
      while (start < r.out.size() && files->size() < max_files) {
        size_t end = r.out.find('\0', start);
        if (end == std::string::npos) end = r.out.size();
        std::string rel = r.out.substr(start, end - start);
        if (!rel.empty() && fs::is_regular_file(fs::path(root) / rel, ec)) files->push_back(rel);
        start = end + 1;
      }
      *how = "git ls-files";
      return true;
    }
    // Not usable (git missing, not a work tree, dubious ownership): walk instead.
  }
  *how = "directory walk";
  // Unreadable folders below are skipped; an unreadable top would be an empty repository.
  if (faccessat(AT_FDCWD, root.c_str(), R_OK | X_OK, AT_EACCESS) != 0) {
    *error = "cannot read " + root + ": " + std::strerror(errno);
    return false;
  }
  fs::recursive_directory_iterator it(root, fs::directory_options::skip_permission_denied, ec);
  if (ec) {
    *error = "cannot read " + root + ": " + ec.message();
    return false;
  }
  for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (ec) break;
    if (cancelled && cancelled()) break;
    if (it->is_directory(ec) && it->path().filename() == ".git") {
      it.disable_recursion_pending();
      continue;
    }
    if (!it->is_regular_file(ec) || it->is_symlink(ec)) continue;
    files->push_back(fs::relative(it->path(), root, ec).string());
    if (files->size() >= max_files) break;
  }
  return true;
}

bool ListTaskRepo(const cortex_task& task, const cortex_host& host, size_t max_files,
                  TaskRepo* repo, cortex_result* stop) {
  repo->path.clear();
  for (size_t i = 0; i < task.n_tags; ++i)
    if (std::string_view("repo") == task.tags[i].key) repo->path = task.tags[i].value;
  if (repo->path.empty()) {
    *stop = {CORTEX_OUTCOME_REJECTED, 0, "needs a repository: tag repo=PATH"};
    return false;
  }
  auto cancelled = [&host] { return host.cancelled(host.ctx) != 0; };
  thread_local std::string error;  // returned to the host, which copies it at once
  if (!ListRepoFiles(repo->path, max_files, cancelled, &repo->files, &repo->how, &error)) {
    *stop = {CORTEX_OUTCOME_FAILURE, 0, error.c_str()};
    return false;
  }
  return true;
}

}  // namespace cortex::experts
