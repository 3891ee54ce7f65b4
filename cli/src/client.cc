#include "cortex/client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

namespace cortex {

Client::~Client() {
  if (fd_ >= 0) close(fd_);
}

namespace {

using Clock = std::chrono::steady_clock;

std::string Seconds(double s) {
  char b[32];
  std::snprintf(b, sizeof b, "%gs", s);
  return b;
}

}  // namespace

void Client::SetTimeout(double seconds, std::function<bool()> still_there) {
  timeout_s_ = seconds > 0 ? seconds : 0;
  still_there_ = std::move(still_there);
}

Status Client::Await(short events) {
  if (timeout_s_ <= 0) return Status::OK();
  const auto period =
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_));
  for (;;) {
    const auto until = Clock::now() + period;
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now());
      pollfd p{fd_, events, 0};
      // (an error or a hangup is ready too: the read or write that follows reports it)
      const int n = poll(&p, 1, static_cast<int>(std::max<int64_t>(0, left.count())));
      if (n > 0) return Status::OK();
      if (n < 0 && errno != EINTR)
        return Status::IOError(std::string("poll: ") + std::strerror(errno));
      if (n == 0 && Clock::now() >= until) break;
    }
    // Silence past the bound: a request that legitimately runs long goes on while cortexd
    // shows itself alive.
    if (still_there_ && still_there_()) continue;
    return Status::Timeout("cortexd does not answer: nothing from it in " + Seconds(timeout_s_));
  }
}

Status Client::Connect(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path))
    return Status::InvalidArgument("socket path is too long: " + path);
  // Bounded, the socket does not block: a stopped daemon whose queue of connections is
  // full would hold a blocking connect for ever.
  fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (timeout_s_ > 0 ? SOCK_NONBLOCK : 0), 0);
  if (fd_ < 0) return Status::IOError(std::string("socket: ") + std::strerror(errno));
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(timeout_s_));
  int rc;
  // A Unix socket's connect never completes later: EAGAIN says the queue is full.
  while ((rc = connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr)) != 0 &&
         (errno == EINTR || (errno == EAGAIN && Clock::now() < until)))
    if (errno == EAGAIN) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  if (rc != 0) {
    int err = errno;
    close(fd_);
    fd_ = -1;
    // The daemon may well be running: the socket (or a folder above it) is not ours.
    if (err == EACCES || err == EPERM)
      return Status::PermissionDenied("cannot connect to cortexd at " + path + ": " +
                                      std::strerror(err));
    if (err == EAGAIN)
      return Status::Timeout("cortexd does not answer: it took in no connection in " +
                             Seconds(timeout_s_));
    return Status::Unavailable("cannot reach cortexd at " + path + ": " + std::strerror(err));
  }
  return Status::OK();
}

Status Client::SendRaw(const std::string& bytes) {
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t w = send(fd_, bytes.data() + off, bytes.size() - off,
                     MSG_NOSIGNAL | (timeout_s_ > 0 ? MSG_DONTWAIT : 0));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      CORTEX_RETURN_IF_ERROR(Await(POLLOUT));
      continue;
    }
    if (w <= 0)
      return Status::Unavailable(std::string("lost connection to cortexd: ") +
                                 std::strerror(errno));
    off += static_cast<size_t>(w);
  }
  return Status::OK();
}

Status Client::ReadLine(std::string* line) {
  for (;;) {
    size_t pos = buf_.find('\n');
    if (pos != std::string::npos) {
      *line = buf_.substr(0, pos);
      buf_.erase(0, pos + 1);
      return Status::OK();
    }
    CORTEX_RETURN_IF_ERROR(Await(POLLIN));
    char chunk[65536];
    ssize_t n = recv(fd_, chunk, sizeof chunk, timeout_s_ > 0 ? MSG_DONTWAIT : 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
    if (n <= 0) return Status::Unavailable("cortexd closed the connection");
    buf_.append(chunk, static_cast<size_t>(n));
  }
}

Status Client::Call(const nlohmann::json& request, nlohmann::json* response,
                    const std::function<void(const nlohmann::json&)>& on_row) {
  if (fd_ < 0) return Status::FailedPrecondition("not connected");
  std::string line;
  try {
    line = request.dump() + "\n";
  } catch (const nlohmann::json::exception& e) {
    return Status::InvalidArgument(std::string("cannot encode the request: ") + e.what());
  }
  // A daemon that refuses the connection (peer check, connection limit) answers and
  // closes at once: its answer is still worth reading when sending failed.
  Status sent = SendRaw(line);
  for (bool first = true;; first = false) {
    if (!sent.ok() && !first) return sent;
    Status got = ReadLine(&line);
    if (!got.ok()) return sent.ok() ? got : sent;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) return Status::Internal("cortexd sent a malformed response");
    if (j.contains("row")) {
      if (on_row) on_row(j["row"]);
      continue;
    }
    *response = std::move(j);
    return Status::OK();
  }
}

}  // namespace cortex
