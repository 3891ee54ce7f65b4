// A private PostgreSQL server for the tests: initdb into a new folder under /tmp, a Unix
// socket there and no TCP, run as `nobody` when the tests run as root (PostgreSQL refuses
// root). ctest starts one for the whole run (the fixture `cortex-test-pg start`, which
// records the folder in the file CORTEX_TEST_PG_STATE names); a test binary run alone
// starts its own on first use and stops it at exit.
#pragma once

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

  // Starts a server in a new folder (its path in `dir`); false with the reason in `why`.
  static bool Start(std::string* dir, std::string* why);
  static void Stop(const std::string& dir);
  // Whether PostgreSQL's server programs are installed.
  static bool Installed();

 private:
  std::string dir_;
};

}  // namespace cortex::test
