// A client for cortexd's socket: one JSON request per line, one JSON response per line
// (export streams {"row": ...} lines before its response). Used by cortexctl, the bench
// tool and the tests.
#pragma once

#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "cortex/status.h"

namespace cortex {

class Client {
 public:
  Client() = default;
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Before Connect: bounds every wait for cortexd (connecting, sending, each read): after
  // `seconds` (> 0) in which cortexd sent nothing, a call fails with Timeout, unless
  // `still_there` (asked at each expiry: is cortexd alive, only busy?) says to wait another
  // `seconds`. 0 (the default): no bound.
  void SetTimeout(double seconds, std::function<bool()> still_there = nullptr);

  // Unavailable when no daemon listens at `socket_path`; PermissionDenied when the socket
  // (or a folder on its path) does not let this user in; Timeout when the daemon takes in
  // no connection (its queue is full) within the timeout.
  Status Connect(const std::string& socket_path);
  // Sends `request`, fills `response` with the final response line. Lines before it
  // that carry a "row" go to `on_row`.
  Status Call(const nlohmann::json& request, nlohmann::json* response,
              const std::function<void(const nlohmann::json&)>& on_row = nullptr);
  // Raw access for tests of the protocol itself.
  Status SendRaw(const std::string& bytes);
  Status ReadLine(std::string* line);

 private:
  // Waits until fd_ is ready for `events`; Timeout as SetTimeout says.
  Status Await(short events);

  int fd_ = -1;
  std::string buf_;
  double timeout_s_ = 0;
  std::function<bool()> still_there_;
};

}  // namespace cortex
