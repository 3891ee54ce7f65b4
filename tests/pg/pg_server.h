// A private PostgreSQL server for the tests: initdb into a new folder under /tmp, a Unix
// socket there and no TCP, run as `nobody` when the tests run as root (PostgreSQL refuses
// root). ctest starts one for the whole run (the fixture `cortex-test-pg start`, which
// records the folder in the file CORTEX_TEST_PG_STATE names); a test binary run alone
// starts its own on first use and stops it at exit.
#pragma once

#include <memory>
#include <string>

namespace cortex::test {

class PgServer {
 public:
  // The server for this process, or null with the reason (PostgreSQL's server programs
  // are not installed, or the server would not start).
  static PgServer* Get(std::string* why);
  // A new empty database on it, as a postgresql:// URI.
  std::string NewDatabase();
  // The superuser's URI for database `db`.
  std::string Url(const std::string& db) const;

  // A server of the caller's own, for a test that takes it down: null with the reason. It
  // is stopped, and its folder removed, when the object goes.
  static std::unique_ptr<PgServer> StartOwn(std::string* why);
  ~PgServer();
  // An outage: the server stops at once, as on a crash (Halt), and starts again on the
  // same data (Resume; false with the reason).
  void Halt();
  bool Resume(std::string* why);

  // Starts a server in a new folder (its path in `dir`); false with the reason in `why`.
  static bool Start(std::string* dir, std::string* why);
  static void Stop(const std::string& dir);
  // Whether PostgreSQL's server programs are installed.
  static bool Installed();

 private:
  static bool Launch(const std::string& dir, std::string* why);  // pg_ctl start
  static void Halt(const std::string& dir);                      // pg_ctl stop -m immediate
  std::string dir_;
  bool own_ = false;
};

}  // namespace cortex::test
