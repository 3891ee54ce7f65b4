// The Unix-socket front of cortexd: line-delimited JSON requests, one thread per
// connection, every request validated before it reaches the daemon.
#pragma once

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "cortex/config.h"
#include "cortex/experts.h"
#include "cortex/status.h"
#include "cortex/store.h"

namespace cortex {

// What the server needs from the daemon.
class RequestHandler {
 public:
  virtual ~RequestHandler() = default;
  virtual const DaemonConfig& limits() const = 0;
  virtual Status Submit(const std::string& text, const Tags& tags, std::string* id) = 0;
  virtual Status Route(const std::string& text, const Tags& tags, Decision* d) = 0;
  // True once the task is final; false at the timeout or when the daemon stops.
  virtual bool WaitDone(const std::string& id, double timeout_s) = 0;
  virtual Store* store() = 0;
  virtual ExpertRegistry* registry() = 0;
  virtual nlohmann::json Status_() = 0;
  virtual Status Reload(nlohmann::json* summary) = 0;
  // Trains a candidate now. With `wait`, streams progress lines through `progress` and
  // fills `result` with the candidate's metrics; without, only queues the request.
  virtual Status Retrain(bool wait, const std::function<bool(const std::string&)>& progress,
                         nlohmann::json* result) = 0;
  virtual Status Models(nlohmann::json* result) = 0;
  virtual Status Rollback(int version, nlohmann::json* result) = 0;
};

struct ServerLimits {
  int max_connections = 64;
  size_t max_request_bytes = 1 << 20;
  std::string allow_group;  // empty: only the daemon's own user (and root)
};

class Server {
 public:
  Server(RequestHandler* handler, ServerLimits limits) : h_(handler), limits_(limits) {}
  ~Server();
  // Creates the socket (0600) in its folder (0700); refuses when another daemon answers.
  Status Listen(const std::string& path);
  int listen_fd() const { return listen_fd_; }
  void AcceptOne();
  void StopAccepting();
  void CloseConnections();

  // Handles one request line; exposed for tests. `write_line` streams extra lines.
  nlohmann::json HandleLine(const std::string& line,
                            const std::function<bool(const std::string&)>& write_line);

 private:
  void Serve(int fd);
  Status TooLarge() const;
  // The peer-credential check: the daemon's user, root, or a member of allow_group.
  Status CheckPeer(int fd) const;
  nlohmann::json Dispatch(const nlohmann::json& req,
                          const std::function<bool(const std::string&)>& write_line);

  RequestHandler* h_;
  ServerLimits limits_;
  std::string path_;
  int listen_fd_ = -1;
  std::mutex mu_;
  std::condition_variable cv_;
  std::set<int> conns_;
  int active_ = 0;
};

}  // namespace cortex
