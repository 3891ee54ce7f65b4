// The cortexd <-> plugin host protocol, over a socket pair: frames of a 4-byte
// little-endian length and a JSON object. cortexd treats every frame a host sends as
// hostile input (the host runs plugin code): sizes are bounded, every field is checked.
//
//   host -> cortexd   {"op":"hello","pid":N,"memory_limit":B,"manifest":{...}}
//                     {"op":"hello","error":"why the library was refused"}
//   cortexd -> host   {"op":"create","settings":"{...}"}  -> {"op":"created"} or
//   {"op":"created","error":".."}
//                     {"op":"run","id":N,"task":{...}}     ->
//                     {"op":"result","id":N,"outcome":{...}}
//                     {"op":"cancel","id":N}
//                     {"op":"exit"}
//   host -> cortexd   {"op":"oom"} just before it exits for want of memory
#pragma once

#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cortex/experts.h"
#include "cortex/status.h"
#include "cortex/types.h"

namespace cortex::hostproto {

constexpr size_t kMaxFrame = 4 << 20;
constexpr int kHostFd = 3;            // where the host finds its end of the socket pair
constexpr int kExitOutOfMemory = 86;  // the host's exit status when an allocation failed

// Frames from many threads onto one socket. A sender appends its frame; the one that
// finds nobody writing writes everything queued (its own and the others') while the others
// return at once: one send for many frames, and no sender waits for another's write. A
// write that failed fails every later Send.
class FrameWriter {
 public:
  // `on_fail` runs once, on the thread whose write failed first (a held frame's writer
  // has no caller to tell): cortexd ends a host it can no longer reach.
  explicit FrameWriter(int fd, std::function<void(const Status&)> on_fail = nullptr)
      : fd_(fd), on_fail_(std::move(on_fail)) {}
  // `may_hold`: while a Batch lives on this thread, the frame waits for the Batch's end.
  Status Send(const nlohmann::json& frame, bool may_hold = false);

  // While one lives on a thread, the frames that thread sends with `may_hold` are held
  // and written at its end, all of one socket's in one write: a worker handing a batch of
  // tasks to a host writes once, and the host reads them at once. The writers must
  // outlive it; a write that fails then fails their later Sends.
  class Batch {
   public:
    Batch();
    ~Batch();
    Batch(const Batch&) = delete;
    Batch& operator=(const Batch&) = delete;

   private:
    friend class FrameWriter;
    Batch* outer_;
    std::vector<std::pair<FrameWriter*, std::string>> held_;
  };

 private:
  Status Write(std::string bytes);  // appends them; writes unless another sender is at it
  const int fd_;
  const std::function<void(const Status&)> on_fail_;
  std::mutex mu_;
  std::string out_;  // frames waiting for the writer
  bool writing_ = false;
  Status failed_;
};

// Cuts a byte stream into frames.
class FrameReader {
 public:
  // Appends bytes; whole frames go to `frames`. An oversize frame or one that is not a
  // JSON object is an error (the stream cannot be trusted after it).
  Status Feed(const char* data, size_t n, std::vector<nlohmann::json>* frames);

 private:
  std::string buf_;
};

nlohmann::json ManifestToJson(const Manifest& m);
Status ManifestFromJson(const nlohmann::json& j, Manifest* out);  // validated like ManifestFromC
nlohmann::json TaskToJson(const Task& t, int64_t deadline_unix_ms);
Status TaskFromJson(const nlohmann::json& j, Task* t, int64_t* deadline_unix_ms);
nlohmann::json OutcomeToJson(const Outcome& o);
// Only what a plugin may report (success, failure, timeout, crash, rejected); quality is
// clamped to [0,1], error and output are bounded.
Status OutcomeFromJson(const nlohmann::json& j, Outcome* out);

}  // namespace cortex::hostproto
