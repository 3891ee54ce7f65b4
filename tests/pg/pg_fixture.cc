// ctest's fixture around the suites that need PostgreSQL: `start STATE` starts a private
// server and writes its folder to the file STATE; `stop STATE` stops it and removes both.
#include <cstdio>
#include <fstream>
#include <string>

#include "pg_server.h"

int main(int argc, char** argv) {
  if (argc != 3 || (std::string(argv[1]) != "start" && std::string(argv[1]) != "stop")) {
    std::fprintf(stderr, "usage: cortex-test-pg start|stop STATE_FILE\n");
    return 2;
  }
  const std::string state = argv[2];
  if (std::string(argv[1]) == "stop") {
    std::ifstream in(state);
    std::string dir;
    std::getline(in, dir);
    if (!dir.empty()) cortex::test::PgServer::Stop(dir);
    std::remove(state.c_str());
    return 0;
  }
  std::string dir, why;
  if (!cortex::test::PgServer::Start(&dir, &why)) {
    std::fprintf(stderr, "no PostgreSQL server for the tests: %s\n", why.c_str());
    std::remove(state.c_str());
    if (!dir.empty()) cortex::test::PgServer::Stop(dir);
    // Not installed: the suites skip their PostgreSQL cases, each saying why. Installed
    // but failing: that is a failure.
    return cortex::test::PgServer::Installed() ? 1 : 0;
  }
  std::ofstream(state) << dir << "\n";
  std::printf("PostgreSQL for the tests: %s\n", dir.c_str());
  return 0;
}
