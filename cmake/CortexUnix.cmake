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
  set(CORTEX_UNIT_TYPE notify)
  target_link_libraries(cortex_daemon PRIVATE PkgConfig::SYSTEMD)
  target_compile_definitions(cortex_daemon PRIVATE CORTEX_HAVE_SYSTEMD=1)
  message(STATUS "cortex: libsystemd ${SYSTEMD_VERSION}: cortexd notifies systemd (Type=notify)")
else()
  set(CORTEX_HAVE_SYSTEMD OFF)
  # Type=notify would wait for a READY=1 that never comes; exec is the best without it.
  set(CORTEX_UNIT_TYPE exec)
  message(STATUS "cortex: libsystemd not found (Debian: libsystemd-dev): cortexd is built "
                 "without readiness notification, and its unit is Type=exec")
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
set(CORTEX_UNIT_TYPE ${CORTEX_UNIT_TYPE})
configure_file(\"${CORTEX_UNIT_IN}\" \"${_unit_staged}\" @ONLY)")
install(FILES ${_unit_staged} DESTINATION lib/systemd/user)

# ---- man pages ----------------------------------------------------------------------
find_program(SCDOC_EXECUTABLE scdoc)
set(CORTEX_MAN_DIR ${CMAKE_BINARY_DIR}/share/man)
set(CORTEX_MAN_PAGES "")
if(SCDOC_EXECUTABLE)
  foreach(page cortexctl.1 cortexd.8 cortex.yaml.5)
    string(REGEX MATCH "[0-9]$" section ${page})
    set(src ${CMAKE_SOURCE_DIR}/docs/man/${page}.scd)
    set(out ${CORTEX_MAN_DIR}/man${section}/${page})
    add_custom_command(
      OUTPUT ${out}
      COMMAND ${CMAKE_COMMAND} -E make_directory ${CORTEX_MAN_DIR}/man${section}
      COMMAND ${CMAKE_COMMAND} -DSCDOC=${SCDOC_EXECUTABLE} -DIN=${src} -DOUT=${out} -P
              ${CMAKE_SOURCE_DIR}/cmake/CortexScdoc.cmake
      DEPENDS ${src} ${CMAKE_SOURCE_DIR}/cmake/CortexScdoc.cmake
      COMMENT "scdoc ${page}"
      VERBATIM)
    install(FILES ${out} DESTINATION share/man/man${section})
    list(APPEND CORTEX_MAN_PAGES ${out})
  endforeach()
  add_custom_target(man ALL DEPENDS ${CORTEX_MAN_PAGES})
  set(CORTEX_HAVE_MAN_PAGES ON)
  message(STATUS "cortex: man pages from docs/man/*.scd with ${SCDOC_EXECUTABLE}")
else()
  set(CORTEX_HAVE_MAN_PAGES OFF)
  message(STATUS "cortex: scdoc not found (Debian: scdoc): the man pages cortexctl(1), "
                 "cortexd(8) and cortex.yaml(5) are not built or installed")
endif()
