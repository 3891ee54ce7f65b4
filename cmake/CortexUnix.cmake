# What makes Cortex a well-behaved Unix package: readiness notification to systemd
# (libsystemd), the systemd user unit, and the man pages generated from docs/man/*.scd.
# Included after the daemon's targets exist and before the tests, which read
# CORTEX_HAVE_SYSTEMD, CORTEX_HAVE_MAN_PAGES, CORTEX_MAN_DIR and CORTEX_UNIT_FILE.

# ---- sd_notify ----------------------------------------------------------------------
find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  pkg_check_modules(SYSTEMD IMPORTED_TARGET libsystemd)
endif()
if(SYSTEMD_FOUND)
  set(CORTEX_HAVE_SYSTEMD ON)
  target_link_libraries(cortex_daemon PRIVATE PkgConfig::SYSTEMD)
  target_compile_definitions(cortex_daemon PRIVATE CORTEX_HAVE_SYSTEMD=1)
  message(STATUS "cortex: libsystemd ${SYSTEMD_VERSION}: cortexd notifies systemd (Type=notify)")
else()
  set(CORTEX_HAVE_SYSTEMD OFF)
  message(STATUS "cortex: libsystemd not found (Debian: libsystemd-dev): cortexd is built "
                 "without readiness notification; the unit's Type=notify would time out")
endif()

# ---- systemd user unit --------------------------------------------------------------
# The build tree mirrors the install tree, so the build-tree copy points at build/bin and
# is what the tests verify; the installed copy is configured at install time, so
# `cmake --install build --prefix ~/.local` gets ~/.local/bin/cortexd in ExecStart.
set(CORTEX_UNIT_IN ${CMAKE_SOURCE_DIR}/daemon/cortexd.service.in)
set(CORTEX_UNIT_FILE ${CMAKE_BINARY_DIR}/lib/systemd/user/cortexd.service)
set(prefix ${CMAKE_BINARY_DIR})
configure_file(${CORTEX_UNIT_IN} ${CORTEX_UNIT_FILE} @ONLY)
unset(prefix)
set(_unit_staged ${CMAKE_BINARY_DIR}/install-staging/cortexd.service)
install(CODE "set(prefix \"\${CMAKE_INSTALL_PREFIX}\")
configure_file(\"${CORTEX_UNIT_IN}\" \"${_unit_staged}\" @ONLY)")
install(FILES ${_unit_staged} DESTINATION lib/systemd/user)
