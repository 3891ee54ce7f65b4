#include "cortex/env.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>

namespace cortex {
namespace {

Status ErrnoStatus(const std::string& what, int err) {
  std::string msg = what + ": " + std::strerror(err);
  if (err == ENOENT) return Status::NotFound(msg);
  return Status::IOError(msg);
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
    info->exists = true;
    info->is_dir = S_ISDIR(st.st_mode);
    info->is_regular = S_ISREG(st.st_mode);
    info->uid = st.st_uid;
    info->mode = st.st_mode & 07777;
    info->size = static_cast<uint64_t>(st.st_size);
    info->inode = st.st_ino;
    info->mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000LL + st.st_mtim.tv_nsec;
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
};

}  // namespace

Env* Env::Default() {
  static PosixEnv env;
  return &env;
}

}  // namespace cortex
