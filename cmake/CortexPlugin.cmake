# cortex_add_plugin(<name> <source>... [OUTPUT_DIR <dir>] [DEFINES <definition>...])
#
# Builds <name>.so, a Cortex expert plugin, with the flags Cortex builds its own with:
# a MODULE (loaded, never linked against) without the "lib" prefix, every symbol hidden
# but the entry point (CORTEX_EXPORT_PLUGIN marks it), and no undefined symbols, so a
# missing library fails the link instead of the load inside cortexd's plugin host.
# Installed with the Cortex package (find_package(Cortex)) and used by Cortex's own tree.
function(cortex_add_plugin name)
  cmake_parse_arguments(P "" "OUTPUT_DIR" "DEFINES" ${ARGN})
  if(NOT P_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "cortex_add_plugin(${name}): no source files")
  endif()
  add_library(${name} MODULE ${P_UNPARSED_ARGUMENTS})
  target_link_libraries(${name} PRIVATE Cortex::plugin_sdk)
  if(P_DEFINES)
    target_compile_definitions(${name} PRIVATE ${P_DEFINES})
  endif()
  set_target_properties(${name} PROPERTIES PREFIX "" OUTPUT_NAME ${name}
                        CXX_VISIBILITY_PRESET hidden C_VISIBILITY_PRESET hidden
                        VISIBILITY_INLINES_HIDDEN ON)
  if(P_OUTPUT_DIR)
    set_target_properties(${name} PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${P_OUTPUT_DIR})
  endif()
  target_link_options(${name} PRIVATE -Wl,--no-undefined)
endfunction()
