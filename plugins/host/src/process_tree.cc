#include "process_tree.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace cortex {
namespace {

// The session id from /proc/PID/stat (the 4th field after the command's closing
// parenthesis), or -1.
pid_t SessionOf(const char* pid) {
  char path[64], buf[512];
  std::snprintf(path, sizeof path, "/proc/%s/stat", pid);
  int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return -1;
  buf[n] = '\0';
  const char* p = std::strrchr(buf, ')');
  if (!p) return -1;
  // ") S ppid pgrp session": skip the state, the parent and the group.
  for (int field = 0; field < 4 && p; ++field) p = std::strchr(p + 1, ' ');
  return p ? static_cast<pid_t>(std::strtol(p + 1, nullptr, 10)) : -1;
}

}  // namespace

int KillSession(pid_t sid, pid_t keep) {
  int total = 0;
  for (int pass = 0; pass < 5; ++pass) {
    DIR* d = ::opendir("/proc");
    if (!d) break;
    int found = 0;
    while (struct dirent* e = ::readdir(d)) {
      if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
      const pid_t pid = static_cast<pid_t>(std::strtol(e->d_name, nullptr, 10));
      if (pid == keep || SessionOf(e->d_name) != sid) continue;
      if (::kill(pid, SIGKILL) == 0) ++found;
    }
    ::closedir(d);
    total += found;
    if (found == 0) break;
  }
  return total;
}

}  // namespace cortex
