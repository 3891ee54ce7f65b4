#include "process_tree.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

namespace cortex {
namespace {

// The parent and the session from /proc/PID/stat (fields 2 and 4 after the command's
// closing parenthesis); false if the process is gone.
bool ParentAndSession(const char* pid, pid_t* ppid, pid_t* sid) {
  char path[64], buf[512];
  std::snprintf(path, sizeof path, "/proc/%s/stat", pid);
  int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  const char* p = std::strrchr(buf, ')');
  if (!p || !(p = std::strchr(p + 1, ' '))) return false;  // ") S ppid pgrp session"
  if (!(p = std::strchr(p + 1, ' '))) return false;
  *ppid = static_cast<pid_t>(std::strtol(p + 1, nullptr, 10));
  for (int field = 0; field < 2 && p; ++field) p = std::strchr(p + 1, ' ');
  if (!p) return false;
  *sid = static_cast<pid_t>(std::strtol(p + 1, nullptr, 10));
  return true;
}

// Calls fn(pid, ppid, sid) for every process; stops early when it returns false.
template <typename Fn>
void ForEachProcess(Fn fn) {
  DIR* d = ::opendir("/proc");
  if (!d) return;
  while (struct dirent* e = ::readdir(d)) {
    if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
    pid_t ppid, sid;
    if (!ParentAndSession(e->d_name, &ppid, &sid)) continue;
    if (!fn(static_cast<pid_t>(std::strtol(e->d_name, nullptr, 10)), ppid, sid)) break;
  }
  ::closedir(d);
}

}  // namespace

int KillSession(pid_t sid, pid_t keep) {
  int total = 0;
  for (int pass = 0; pass < 5; ++pass) {
    int found = 0;
    ForEachProcess([&](pid_t pid, pid_t, pid_t s) {
      if (pid != keep && s == sid && ::kill(pid, SIGKILL) == 0) ++found;
      return true;
    });
    total += found;
    if (found == 0) break;
  }
  return total;
}

int SignalDescendants(pid_t root, int sig) {
  std::map<pid_t, std::vector<pid_t>> children;
  ForEachProcess([&](pid_t pid, pid_t ppid, pid_t) {
    children[ppid].push_back(pid);
    return true;
  });
  int total = 0;
  std::vector<pid_t> todo = {root};
  while (!todo.empty()) {
    const pid_t p = todo.back();
    todo.pop_back();
    for (pid_t c : children[p]) {
      if (::kill(c, sig) == 0) ++total;
      todo.push_back(c);
    }
  }
  return total;
}

}  // namespace cortex
