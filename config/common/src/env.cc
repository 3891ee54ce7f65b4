#include "cortex/env.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <sstream>

namespace cortex {
namespace {

Status ErrnoStatus(const std::string& what, int err) {
  std::string msg = what + ": " + std::strerror(err);
  if (err == ENOENT) return Status::NotFound(msg);
  return Status::IOError(msg);
}

// The first entry of the open folder `dir_fd` that cortexd does not make in its own
// folders (sockets, locks, plugin caches, its log, SQLite files); "" if none.
std::string OctalMode(mode_t mode) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%04o", static_cast<unsigned>(mode & 07777));
  return buf;
}

std::string ForeignEntry(int dir_fd) {
  int fd = ::openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  DIR* d = fd < 0 ? nullptr : ::fdopendir(fd);
  if (!d) {
    if (fd >= 0) ::close(fd);
    return "";
  }
  auto ends = [](const std::string& n, const char* e) {
    const size_t k = std::strlen(e);
    return n.size() >= k && n.compare(n.size() - k, k, e) == 0;
  };
  std::string found;
  while (struct dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n == "." || n == ".." || e->d_type == DT_SOCK || n.rfind("plugin-cache.", 0) == 0 ||
        n.rfind("cortexd.log", 0) == 0 || ends(n, ".sock") || ends(n, ".lock") || ends(n, ".db") ||
        ends(n, ".db-wal") || ends(n, ".db-shm"))
      continue;
    found = n;
    break;
  }
  ::closedir(d);
  return found;
}

Status ForeignFiles(const std::string& path, mode_t mode, int fd) {
  const std::string other = ForeignEntry(fd);
  if (other.empty()) return Status::OK();
  return Status::FailedPrecondition(path + " is open to others (mode " + OctalMode(mode) +
                                    ") and holds files not cortexd's (" + other +
                                    "); refusing to make it private under them: choose a " +
                                    "folder of cortexd's own, e.g. " + path + "/cortex");
}

Status NotOurs(const std::string& path, uid_t owner) {
  return Status::FailedPrecondition(
      path + " belongs to uid " + std::to_string(owner) + ", not to you (uid " +
      std::to_string(::geteuid()) +
      "): another user may have made it to take over cortexd's files; refusing to use "
      "it. Remove it (it is not yours: ask its owner or root), or choose another location");
}

// A folder all users share (sticky and world-writable, like /tmp): fine to hold a private
// folder, never to be one.
Status SharedFolder(const std::string& path, const struct stat& st) {
  char mode[8];
  std::snprintf(mode, sizeof mode, "%04o", st.st_mode & 07777);
  return Status::FailedPrecondition(
      path + " is a folder all users share (mode " + mode +
      "); cortexd's files need a private folder: choose a folder of their own inside it, "
      "e.g. " +
      (path == "/" ? std::string() : path) + "/cortex-" + std::to_string(::geteuid()));
}

class PosixEnv : public Env {
 public:
  double NowUnix() override {
    using namespace std::chrono;
    return duration<double>(system_clock::now().time_since_epoch()).count();
  }
  int64_t MonotonicMicros() override {
    using namespace std::chrono;
    return duration_cast<microseconds>(steady_clock::now().time_since_epoch()).count();
  }
  Status Stat(const std::string& path, FileInfo* info) override {
    struct stat st {};
    *info = FileInfo{};
    if (::stat(path.c_str(), &st) != 0) {
      if (errno == ENOENT) return Status::OK();  // exists=false
      return ErrnoStatus(path, errno);
    }
    *info = FileInfoOf(st);
    return Status::OK();
  }
  Status ListDir(const std::string& dir, std::vector<std::string>* names) override {
    names->clear();
    DIR* d = ::opendir(dir.c_str());
    if (!d) return ErrnoStatus(dir, errno);
    while (struct dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n != "." && n != "..") names->push_back(n);
    }
    ::closedir(d);
    return Status::OK();
  }
  Status ReadFile(const std::string& path, std::string* out) override {
    std::ifstream in(path, std::ios::binary);
    if (!in) return ErrnoStatus(path, errno ? errno : ENOENT);
    std::ostringstream ss;
    ss << in.rdbuf();
    *out = ss.str();
    return Status::OK();
  }
  Status CreateDirs(const std::string& path, uint32_t mode) override {
    if (path.empty()) return Status::InvalidArgument("empty directory path");
    std::string cur;
    size_t pos = 0;
    while (pos != std::string::npos) {
      pos = path.find('/', pos + 1);
      cur = path.substr(0, pos);
      if (cur.empty()) continue;
      if (::mkdir(cur.c_str(), mode) != 0 && errno != EEXIST) return ErrnoStatus(cur, errno);
    }
    return Status::OK();
  }
  uint32_t CurrentUid() override { return ::geteuid(); }

  Status MakePrivateDir(const std::string& path, bool tighten) override {
    if (path.empty()) return Status::InvalidArgument("empty directory path");
    const size_t slash = path.find_last_of('/');
    if (slash != std::string::npos && slash > 0)
      CORTEX_RETURN_IF_ERROR(CreateDirs(path.substr(0, slash), 0700));
    if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST) return ErrnoStatus(path, errno);
    // Whether we just made it or it was there, judge what is there now, through a
    // descriptor: a symlink or a folder swapped in between cannot be judged by path.
    int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
      if (errno == ELOOP || errno == ENOTDIR) {
        struct stat ls {};
        const bool link = ::lstat(path.c_str(), &ls) == 0 && S_ISLNK(ls.st_mode);
        return Status::FailedPrecondition(
            path + (link ? " is a symbolic link" : " is not a directory") +
            "; refusing to use it as a private folder (someone may be trying to redirect "
            "cortexd's files): remove it, or choose another location");
      }
      struct stat ls {};
      if (errno == EACCES && ::lstat(path.c_str(), &ls) == 0 && ls.st_uid != ::geteuid())
        return NotOurs(path, ls.st_uid);  // another user's private folder: say whose
      return ErrnoStatus(path, errno);
    }
    struct stat st {};
    Status result;
    if (::fstat(fd, &st) != 0) {
      result = ErrnoStatus(path, errno);
    } else if (st.st_uid != ::geteuid() && (st.st_mode & S_ISVTX)) {
      result = SharedFolder(path, st);
    } else if (st.st_uid != ::geteuid()) {
      result = NotOurs(path, st.st_uid);
    } else if (st.st_mode & S_ISVTX && st.st_mode & 002) {
      result = SharedFolder(path, st);
    } else if (st.st_mode & 022) {
      char mode[8];
      std::snprintf(mode, sizeof mode, "%04o", st.st_mode & 07777);
      result = Status::FailedPrecondition(
          path + " is writable by " + ((st.st_mode & 002) ? "others" : "its group") + " (mode " +
          mode +
          "): others may have put files in it; refusing to use it. Remove it and let cortexd "
          "make it again, or check its contents and chmod 700 it");
    } else if (tighten && (st.st_mode & 077)) {
      // Made private only if nothing but cortexd's own files is in it: a folder others
      // use (/run, a home) given as the socket's would otherwise be closed to them.
      result = ForeignFiles(path, st.st_mode, fd);
      if (result.ok() && ::fchmod(fd, 0700) != 0)
        result = ErrnoStatus("cannot make " + path + " private (0700)", errno);
    }
    ::close(fd);
    return result;
  }

  Status MakePrivateFile(const std::string& path) override {
    // (Non-blocking: a FIFO planted under this name must not hang whoever opens it.)
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK, 0600);
    if (fd < 0) {
      if (errno == ELOOP)
        return Status::FailedPrecondition(path +
                                          " is a symbolic link; refusing to write through it: "
                                          "remove it, or choose another location");
      return ErrnoStatus(path, errno);
    }
    struct stat st {};
    Status result;
    if (::fstat(fd, &st) != 0)
      result = ErrnoStatus(path, errno);
    else if (!S_ISREG(st.st_mode))
      result = Status::FailedPrecondition(path + " is not a regular file");
    else if (st.st_uid != ::geteuid())
      result = Status::FailedPrecondition(path + " belongs to uid " + std::to_string(st.st_uid) +
                                          ", not to you (uid " + std::to_string(::geteuid()) +
                                          "); refusing to use it");
    else if ((st.st_mode & 077) && ::fchmod(fd, 0600) != 0)
      result = ErrnoStatus("cannot make " + path + " private (0600)", errno);
    ::close(fd);
    return result;
  }
};

}  // namespace

namespace {

std::string Octal(uint32_t mode) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%04o", mode & 07777);
  return buf;
}

}  // namespace

FileInfo FileInfoOf(const struct ::stat& st) {
  FileInfo fi;
  fi.exists = true;
  fi.is_dir = S_ISDIR(st.st_mode);
  fi.is_regular = S_ISREG(st.st_mode);
  fi.uid = st.st_uid;
  fi.mode = st.st_mode & 07777;
  fi.size = static_cast<uint64_t>(st.st_size);
  fi.inode = st.st_ino;
  fi.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000LL + st.st_mtim.tv_nsec;
  return fi;
}

Status CheckOwnFolder(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return Status::OK();  // to be made, or refused as MakePrivateDir says
  struct stat st {};
  Status result;
  if (::fstat(fd, &st) == 0 && st.st_uid == ::geteuid() && (st.st_mode & 077))
    result = ForeignFiles(path, st.st_mode, fd);
  ::close(fd);
  return result;
}

Status JudgeOwnership(const std::string& name, bool want_dir, const FileInfo& fi, uint32_t me) {
  if (want_dir ? !fi.is_dir : !fi.is_regular)
    return Status::FailedPrecondition(
        name + (want_dir ? " is not a directory" : " is not a regular file"));
  if (fi.uid != me && fi.uid != 0)
    return Status::FailedPrecondition("unsafe ownership: " + name + " is owned by uid " +
                                      std::to_string(fi.uid) + ", not by you (uid " +
                                      std::to_string(me) + ") or root");
  if (fi.mode & 022)
    return Status::FailedPrecondition("unsafe permissions: " + name + " is writable by " +
                                      ((fi.mode & 002) ? "others" : "its group") + " (mode " +
                                      Octal(fi.mode) + "); chmod go-w it");
  return Status::OK();
}

Status CheckTrustedPath(const std::string& path, bool want_dir) {
  if (path.empty()) return Status::InvalidArgument("empty path");
  std::string start = path;
  if (start[0] != '/') {
    char cwd[PATH_MAX];
    if (!::getcwd(cwd, sizeof cwd)) return ErrnoStatus("getcwd", errno);
    start = std::string(cwd) + "/" + start;
  }
  auto push_front = [](std::deque<std::string>* parts, const std::string& p) {
    std::deque<std::string> mine;
    for (size_t b = 0, e; b <= p.size(); b = e + 1) {
      e = p.find('/', b);
      if (e == std::string::npos) e = p.size();
      std::string c = p.substr(b, e - b);
      if (!c.empty() && c != ".") mine.push_back(std::move(c));
    }
    parts->insert(parts->begin(), mine.begin(), mine.end());
  };
  std::deque<std::string> rest;
  push_front(&rest, start);
  const uint32_t me = ::geteuid();
  std::string cur = "/";  // judged, and free of symlinks
  int links = 0;
  while (!rest.empty()) {
    std::string c = std::move(rest.front());
    rest.pop_front();
    if (c == "..") {  // an ancestor of what is judged: judged already
      cur = cur.substr(0, std::max<size_t>(1, cur.find_last_of('/')));
      continue;
    }
    const std::string next = (cur == "/" ? "" : cur) + "/" + c;
    struct stat st {};
    if (::lstat(next.c_str(), &st) != 0) return ErrnoStatus(next, errno);
    if (S_ISLNK(st.st_mode)) {  // the folder it lies in is judged; now where it points
      // In a sticky folder (/tmp) a link's owner may replace it: only ours or root's.
      if (st.st_uid != 0 && st.st_uid != me)
        return Status::PermissionDenied(
            "unsafe permissions: " + next + " is a symlink of another user (uid " +
            std::to_string(st.st_uid) + "), who may point it " + "elsewhere at any time");
      char target[PATH_MAX];
      ssize_t n = ::readlink(next.c_str(), target, sizeof target - 1);
      if (n < 0) return ErrnoStatus(next, errno);
      if (++links > 40) return ErrnoStatus(path, ELOOP);
      const std::string t(target, static_cast<size_t>(n));
      if (!t.empty() && t[0] == '/') cur = "/";
      push_front(&rest, t);
      continue;
    }
    const FileInfo fi = FileInfoOf(st);
    if (rest.empty()) {
      const std::string name = next == path ? path : next + " (reached from " + path + ")";
      return JudgeOwnership(name, want_dir, fi, me);
    }
    const std::string name = next + " (a folder above " + path + ")";
    if (fi.is_dir && (fi.mode & S_ISVTX) && (fi.uid == 0 || fi.uid == me)) {
      // Like /tmp: only an entry's owner may rename it; the entry is judged next.
    } else {
      CORTEX_RETURN_IF_ERROR(JudgeOwnership(name, true, fi, me));
    }
    cur = next;
  }
  // The path named "/" itself (or only ".." parts).
  struct stat st {};
  if (::lstat(cur.c_str(), &st) != 0) return ErrnoStatus(cur, errno);
  return JudgeOwnership(cur, want_dir, FileInfoOf(st), me);
}

Env* Env::Default() {
  static PosixEnv env;
  return &env;
}

}  // namespace cortex
