// The Unix-socket front of cortexd: line-delimited JSON requests, every request validated
// before it reaches the daemon. One thread (epoll) reads and answers every connection;
// the submits it reads in one wake-up go to the pipeline together (an intake thread), and
// their answers come back to it as their tasks end. Any other request runs on a thread of
// its own, which writes its own answer (docs/ARCHITECTURE.md, "The path of a task").
#pragma once

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cortex/config.h"
#include "cortex/experts.h"
#include "cortex/status.h"
#include "cortex/store.h"
#include "pipeline.h"

namespace cortex {

// What the server needs from the daemon.
class RequestHandler {
 public:
  virtual ~RequestHandler() = default;
  virtual const DaemonConfig& limits() const = 0;
  // Stores a new task; its id once it is durable. `wait_s` >= 0: the caller will wait
  // that long for its end with WaitDone, and hears of the task only from it.
  virtual Status Submit(const std::string& text, const Tags& tags, double wait_s,
                        std::string* id) = 0;
  // Submits many at once (Pipeline::SubmitMany); Unwatch takes back a submission's on_end.
  virtual void SubmitMany(std::vector<Submission>* batch) = 0;
  virtual bool Unwatch(const std::string& id, const std::shared_ptr<TaskWatch>& watch) = 0;
  virtual bool Stopping() const = 0;  // a stop has begun: waits end now
  virtual Status Route(const std::string& text, const Tags& tags, Decision* d) = 0;
  // Waits until the task is final, `timeout_s` passes or the daemon stops; then *t is the
  // task as stored and *done says whether it has ended.
  virtual Status WaitDone(const std::string& id, double timeout_s, Task* t, bool* done) = 0;
  // Cancels a task: one still queued never runs; a running attempt is asked to stop. The
  // task ends `cancelled` (or as it was ending, if the cancel came too late).
  // FailedPrecondition when it has already ended.
  virtual Status Cancel(const std::string& id) = 0;
  virtual Store* store() = 0;
  virtual ExpertRegistry* registry() = 0;
  virtual nlohmann::json Status_() = 0;
  // A cluster: this node's name, and the expert instances the other live nodes host.
  virtual std::string Node() const { return ""; }
  virtual nlohmann::json RemoteExperts() { return nlohmann::json::array(); }
  virtual Status Reload(nlohmann::json* summary) = 0;
  // Trains a candidate now. With `wait`, streams progress lines through `progress` and
  // fills `result` with the candidate's metrics; without, only queues the request.
  virtual Status Retrain(bool wait, const std::function<bool(const std::string&)>& progress,
                         nlohmann::json* result) = 0;
  virtual Status Models(nlohmann::json* result) = 0;
  // A person's verdict (f.by), bounded by training.feedback_per_hour; the live model learns
  // from it at once.
  virtual Status Feedback(const std::string& id, const Feedback& f, nlohmann::json* result) = 0;
  // Rebuilds the weights that decided task `t` and recomputes its candidates.
  virtual Status Explain(const Task& t, nlohmann::json* result) = 0;
  // Makes model `version` live; one that was refused at validation only with `force`.
  virtual Status Rollback(int version, bool force, nlohmann::json* result) = 0;
};

struct ServerLimits {
  int max_connections = 64;
  size_t max_request_bytes = 1 << 20;
  std::string allow_group;     // empty: only the daemon's own user (and root)
  double idle_timeout_s = 30;  // a connection silent this long (not while served) is closed
};

class Server {
 public:
  Server(RequestHandler* handler, ServerLimits limits);
  ~Server();
  // Creates the socket (0600) in its folder (0700); refuses when another daemon answers.
  // Starts the connection and intake threads.
  Status Listen(const std::string& path);
  int listen_fd() const { return listen_fd_; }
  void AcceptOne();  // the caller's thread: accepts, checks the peer, hands it on
  void StopAccepting();
  // Closes every connection (requests in progress end with them) within 5 seconds, and
  // ends the server's threads.
  void CloseConnections();

  // Handles one request line; exposed for tests. `write_line` streams extra lines.
  nlohmann::json HandleLine(const std::string& line,
                            const std::function<bool(const std::string&)>& write_line);

 private:
  struct Loop;  // the connections' thread and the intake thread (server.cc)
  friend struct Loop;

  Status TooLarge() const;
  // The peer-credential check: the daemon's user, root, or a member of allow_group.
  Status CheckPeer(int fd) const;
  // The request line as JSON, or an error answer (*req is then unset).
  nlohmann::json Parse(const std::string& line, nlohmann::json* req) const;
  // Dispatch, with an exception turned into an Internal error answer. `user` is who asks
  // (the peer's user name): feedback records it.
  nlohmann::json Guarded(const nlohmann::json& req,
                         const std::function<bool(const std::string&)>& write_line,
                         const std::string& user = "");
  nlohmann::json Dispatch(const nlohmann::json& req,
                          const std::function<bool(const std::string&)>& write_line,
                          const std::string& user);

  RequestHandler* h_;
  ServerLimits limits_;
  std::string path_;
  int listen_fd_ = -1;
  bool accept_failing_ = false;  // out of descriptors: said once (AcceptOne, main thread)
  std::unique_ptr<Loop> loop_;
};

}  // namespace cortex
