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

  // Unavailable when no daemon listens at `socket_path`; PermissionDenied when the socket
  // (or a folder on its path) does not let this user in.
  Status Connect(const std::string& socket_path);
  // Sends `request`, fills `response` with the final response line. Lines before it
  // that carry a "row" go to `on_row`.
  Status Call(const nlohmann::json& request, nlohmann::json* response,
              const std::function<void(const nlohmann::json&)>& on_row = nullptr);
  // Raw access for tests of the protocol itself.
  Status SendRaw(const std::string& bytes);
  Status ReadLine(std::string* line);

 private:
  int fd_ = -1;
  std::string buf_;
};

}  // namespace cortex
