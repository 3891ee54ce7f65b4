// The process's view of the outside world (after leveldb's Env): clock, files and
// ownership. Production code goes through Env so tests can inject faults and time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cortex/status.h"

struct stat;

namespace cortex {

struct FileInfo {
  bool exists = false;
  bool is_dir = false;
  bool is_regular = false;
  uint32_t uid = 0;
  uint32_t mode = 0;  // permission bits (st_mode & 07777)
  uint64_t size = 0;
  uint64_t inode = 0;
  int64_t mtime_ns = 0;
};

// What a stat(2) says, as a FileInfo (of a file that exists).
FileInfo FileInfoOf(const struct ::stat& st);

// Whether MakePrivateDir(path, tighten=true) would make `path` private without closing it
// to others' files: an existing folder of ours open to others must hold only cortexd's.
Status CheckOwnFolder(const std::string& path);

// Whether a file cortexd runs or loads (the plugin host, a plugin folder) may be trusted:
// a directory or regular file as `want_dir` says, owned by this user or root, not
// writable by group or others. `name` is what the message calls it.
Status JudgeOwnership(const std::string& name, bool want_dir, const FileInfo& fi, uint32_t me);

// JudgeOwnership for `path` and every folder above it, following symlinks (each link is
// judged by the folder it lies in, then its target's whole path is): anyone who could
// rename an entry on the way could put their own file there. A sticky folder (like /tmp)
// may be writable by all: only an entry's owner can rename it there.
Status CheckTrustedPath(const std::string& path, bool want_dir);

class Env {
 public:
  virtual ~Env() = default;
  // The process-wide real environment.
  static Env* Default();

  virtual double NowUnix() = 0;           // wall clock, seconds since the epoch
  virtual int64_t MonotonicMicros() = 0;  // for durations and deadlines
  virtual Status Stat(const std::string& path, FileInfo* info) = 0;
  virtual Status ListDir(const std::string& dir, std::vector<std::string>* names) = 0;
  virtual Status ReadFile(const std::string& path, std::string* out) = 0;
  // Creates the directory (and parents) with `mode`; an existing one is left as is.
  virtual Status CreateDirs(const std::string& path, uint32_t mode) = 0;
  // A folder only this user may change (socket, plugin cache, store): created 0700
  // (parents as needed), or, if it exists, checked through a descriptor opened without
  // following a symlink: it must be a real directory owned by this user and not writable
  // by anyone else; with `tighten`, one readable by others is made 0700. Anything else
  // is refused with what to do, before anything is put in it.
  virtual Status MakePrivateDir(const std::string& path, bool tighten) = 0;
  // Creates `path` as an empty 0600 file if it does not exist; an existing one must be a
  // regular file (not a symlink) owned by this user, and is tightened to 0600.
  virtual Status MakePrivateFile(const std::string& path) = 0;
  virtual uint32_t CurrentUid() = 0;
};

// An Env that forwards to another; tests override single methods (leveldb's EnvWrapper).
class EnvWrapper : public Env {
 public:
  explicit EnvWrapper(Env* target) : target_(target) {}
  double NowUnix() override { return target_->NowUnix(); }
  int64_t MonotonicMicros() override { return target_->MonotonicMicros(); }
  Status Stat(const std::string& p, FileInfo* i) override { return target_->Stat(p, i); }
  Status ListDir(const std::string& d, std::vector<std::string>* n) override {
    return target_->ListDir(d, n);
  }
  Status ReadFile(const std::string& p, std::string* o) override { return target_->ReadFile(p, o); }
  Status CreateDirs(const std::string& p, uint32_t m) override { return target_->CreateDirs(p, m); }
  Status MakePrivateDir(const std::string& p, bool t) override {
    return target_->MakePrivateDir(p, t);
  }
  Status MakePrivateFile(const std::string& p) override { return target_->MakePrivateFile(p); }
  uint32_t CurrentUid() override { return target_->CurrentUid(); }

 private:
  Env* target_;
};

}  // namespace cortex
