#include "pg_server.h"

#include <fcntl.h>
#include <grp.h>
#include <libpq-fe.h>
#include <pwd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

namespace cortex::test {
namespace fs = std::filesystem;
namespace {

// The newest installed server's programs (Debian: /usr/lib/postgresql/<major>/bin).
std::string PgBin() {
  std::string best;
  int best_v = -1;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/usr/lib/postgresql", ec)) {
    const int v = std::atoi(e.path().filename().c_str());
    if (v > best_v && fs::exists(e.path() / "bin/initdb")) best_v = v, best = e.path() / "bin";
  }
  return best;
}

// Runs argv (stdout and stderr to `log`) as `nobody` when we are root; its exit status.
int RunAs(const std::vector<std::string>& argv, const std::string& log) {
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd >= 0) dup2(fd, 1), dup2(fd, 2);
    int in = open("/dev/null", O_RDONLY);
    if (in >= 0) dup2(in, 0);
    if (chdir("/") != 0) _exit(126);
    if (geteuid() == 0) {
      const passwd* pw = getpwnam("nobody");
      if (!pw || setgroups(0, nullptr) != 0 || setgid(pw->pw_gid) != 0 || setuid(pw->pw_uid) != 0)
        _exit(125);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  int st = 0;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

std::string Tail(const std::string& file) {
  std::ifstream in(file);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  return s.size() > 1500 ? s.substr(s.size() - 1500) : s;
}

std::string StateFileDir() {
  const char* state = std::getenv("CORTEX_TEST_PG_STATE");
  if (!state) return "";
  std::ifstream in(state);
  std::string dir;
  std::getline(in, dir);
  return !dir.empty() && fs::exists(dir + "/.s.PGSQL.5432") ? dir : "";
}

}  // namespace

bool PgServer::Installed() { return !PgBin().empty(); }

bool PgServer::Start(std::string* dir, std::string* why) {
  const std::string bin = PgBin();
  if (bin.empty()) {
    *why = "PostgreSQL's server programs are not installed (Debian package postgresql)";
    return false;
  }
  char tmpl[] = "/tmp/cortex-pg-XXXXXX";
  if (!mkdtemp(tmpl)) {
    *why = "cannot make a folder under /tmp";
    return false;
  }
  *dir = tmpl;
  if (geteuid() == 0) {
    const passwd* pw = getpwnam("nobody");
    if (!pw || chown(tmpl, pw->pw_uid, pw->pw_gid) != 0) {
      *why = "running as root, and cannot hand " + *dir + " to the user nobody";
      return false;
    }
  }
  const std::string data = *dir + "/data";
  if (RunAs({bin + "/initdb", "-D", data, "-U", "cortex", "-A", "trust", "-E", "UTF8",
             "--no-locale", "-N"},
            *dir + "/initdb.log") != 0) {
    *why = "initdb failed: " + Tail(*dir + "/initdb.log");
    return false;
  }
  {
    // No TCP: the socket in the folder is the only way in. fsync stays on: durability is
    // what the tests check.
    std::ofstream conf(data + "/postgresql.conf", std::ios::app);
    conf << "\nlisten_addresses = ''\nunix_socket_directories = '" << *dir
         << "'\nshared_buffers = 16MB\nmax_connections = 200\nfsync = on\n"
            "log_min_messages = warning\n";
  }
  return Launch(*dir, why);
}

bool PgServer::Launch(const std::string& dir, std::string* why) {
  const std::string log = dir + "/server.log";
  if (RunAs({PgBin() + "/pg_ctl", "-D", dir + "/data", "-l", log, "-w", "-t", "60", "start"},
            dir + "/pg_ctl.log") != 0) {
    *why = "the server would not start: " + Tail(log) + Tail(dir + "/pg_ctl.log");
    return false;
  }
  return true;
}

void PgServer::Halt(const std::string& dir) {
  const std::string bin = PgBin();
  if (!bin.empty() && fs::exists(dir + "/data"))
    RunAs({bin + "/pg_ctl", "-D", dir + "/data", "-m", "immediate", "-w", "stop"},
          dir + "/pg_ctl.log");
}

void PgServer::Stop(const std::string& dir) {
  Halt(dir);
  std::error_code ec;
  fs::remove_all(dir, ec);
}

std::unique_ptr<PgServer> PgServer::StartOwn(std::string* why) {
  std::string dir;
  if (!Start(&dir, why)) {
    if (!dir.empty()) Stop(dir);
    return nullptr;
  }
  auto s = std::unique_ptr<PgServer>(new PgServer);
  s->dir_ = dir;
  s->own_ = true;
  return s;
}

PgServer::~PgServer() {
  if (own_) Stop(dir_);
}

void PgServer::Halt() { Halt(dir_); }

bool PgServer::Resume(std::string* why) { return Launch(dir_, why); }

PgServer* PgServer::Get(std::string* why) {
  static std::once_flag once;
  static PgServer* server = nullptr;
  static std::string reason;
  std::call_once(once, [] {
    std::string dir;
    if (std::getenv("CORTEX_TEST_PG_STATE")) {  // under ctest: the fixture's server
      dir = StateFileDir();
      if (dir.empty()) {
        reason = "ctest's fixture started no PostgreSQL server (see the test PgServer.Start)";
        return;
      }
    } else {
      if (!Start(&dir, &reason)) return;
      static std::string own;
      own = dir;
      std::atexit([] { Stop(own); });
    }
    server = new PgServer;
    server->dir_ = dir;
  });
  if (!server) *why = reason;
  return server;
}

std::string PgServer::Url(const std::string& db) const {
  return "postgresql://cortex@/" + db + "?host=" + dir_;
}

std::string PgServer::NewDatabase() {
  static std::atomic<int> n{0};
  const std::string db = "t" + std::to_string(getpid()) + "_" + std::to_string(++n);
  const std::string sql = "CREATE DATABASE " + db;
  // Tests run side by side on one server: a busy moment (all connection slots taken by
  // cluster tests, another CREATE DATABASE copying the template) fails a try, not the test.
  std::string error;
  for (int attempt = 0; attempt < 60; ++attempt) {
    if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(500));
    PGconn* c = PQconnectdb(Url("postgres").c_str());
    if (PQstatus(c) != CONNECTION_OK) {
      error = PQerrorMessage(c);
      PQfinish(c);
      continue;
    }
    PGresult* r = PQexec(c, sql.c_str());
    const bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (!ok) error = PQerrorMessage(c);
    PQclear(r);
    PQfinish(c);
    if (ok) return Url(db);
    if (error.find("already exists") != std::string::npos) return Url(db);  // a retried commit
  }
  std::fprintf(stderr, "PgServer: %s: %s\n", sql.c_str(), error.c_str());
  return "";
}

}  // namespace cortex::test
