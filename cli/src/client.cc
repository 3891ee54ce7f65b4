#include "cortex/client.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace cortex {

Client::~Client() {
  if (fd_ >= 0) close(fd_);
}

Status Client::Connect(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path))
    return Status::InvalidArgument("socket path is too long: " + path);
  fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) return Status::IOError(std::string("socket: ") + std::strerror(errno));
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    int err = errno;
    close(fd_);
    fd_ = -1;
    // The daemon may well be running: the socket (or a folder above it) is not ours.
    if (err == EACCES || err == EPERM)
      return Status::PermissionDenied("cannot connect to cortexd at " + path + ": " +
                                      std::strerror(err));
    return Status::Unavailable("cannot reach cortexd at " + path + ": " + std::strerror(err));
  }
  return Status::OK();
}

Status Client::SendRaw(const std::string& bytes) {
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t w = send(fd_, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
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
    char chunk[65536];
    ssize_t n = recv(fd_, chunk, sizeof chunk, 0);
    if (n < 0 && errno == EINTR) continue;
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
