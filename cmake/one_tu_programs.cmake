# orepa_one_tu_programs(LIBRARY lib ENTRY main|LLVMFuzzerTestOneInput PROGRAMS name...
#                       [SOURCES file...] [LINK target...])
#
# Builds several small programs whose sources would each compile the same blocks, network
# and oneDNN glue as ONE translation unit: static library `lib` holds the code of all of
# them, and each program `name` (name.cpp in the current source folder) is an executable
# made of a two-line generated main that calls into the library. The templates they share
# are instantiated and optimized once, not once per program (the test and sanitizer builds
# compile each example and fuzz target this way; scripts/configure.sh, OREPA_ONE_TU_PROGRAMS).
#
# The program sources stay ordinary programs. The generated translation unit first includes
# every header they include, at global scope; then each source inside its own namespace
# (orepa_program_<name>), so their file-local helpers of the same name do not collide, with
# its ENTRY renamed to orepa_program_<name>_entry by a macro. The headers' include guards
# make the sources' own #include lines no-ops there. SOURCES are appended at global scope as
# they are (sources already written to share a translation unit, e.g. the tools).
function(orepa_one_tu_programs)
  cmake_parse_arguments(ARG "" "LIBRARY;ENTRY" "PROGRAMS;SOURCES;LINK" ${ARGN})
  if(NOT ARG_ENTRY MATCHES "^(main|LLVMFuzzerTestOneInput)$")
    message(FATAL_ERROR "orepa_one_tu_programs: ENTRY must be main or LLVMFuzzerTestOneInput, got '${ARG_ENTRY}'")
  endif()
  set(dir ${CMAKE_CURRENT_BINARY_DIR}/${ARG_LIBRARY}_generated)
  set(includes "#include <cstddef>" "#include <cstdint>" "#include <type_traits>")
  set(bodies "")
  set(adapters "")
  foreach(name IN LISTS ARG_PROGRAMS)
    set(src ${CMAKE_CURRENT_SOURCE_DIR}/${name}.cpp)
    set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${src})  # its #include lines
    file(STRINGS ${src} lines REGEX "^#include[ \t]")
    list(APPEND includes ${lines})
    set(entry orepa_program_${name}_entry)
    string(APPEND bodies "namespace orepa_program_${name} {\n#define ${ARG_ENTRY} ${entry}\n"
                         "#include \"${src}\"\n#undef ${ARG_ENTRY}\n}  // namespace orepa_program_${name}\n\n")
    if(ARG_ENTRY STREQUAL "main")
      # main may be declared with or without (argc, argv).
      string(APPEND adapters "int orepa_program_${name}_main(int argc, char** argv) {\n"
                             "  return orepa_program_call(&orepa_program_${name}::${entry}, argc, argv);\n}\n")
      set(stub "int orepa_program_${name}_main(int argc, char** argv);\n"
               "int main(int argc, char** argv) { return orepa_program_${name}_main(argc, argv); }\n")
    else()
      set(stub "#include <cstddef>\n#include <cstdint>\n"
               "extern \"C\" int ${entry}(const std::uint8_t* data, std::size_t size);\n"
               "extern \"C\" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {\n"
               "  return ${entry}(data, size);\n}\n")
    endif()
    file(CONFIGURE OUTPUT ${dir}/${name}_main.cpp CONTENT "// Generated (cmake/one_tu_programs.cmake).\n${stub}" @ONLY)
  endforeach()
  list(REMOVE_DUPLICATES includes)
  list(JOIN includes "\n" includes)
  set(plain "")
  foreach(src IN LISTS ARG_SOURCES)
    string(APPEND plain "#include \"${CMAKE_CURRENT_SOURCE_DIR}/${src}\"\n")
  endforeach()
  set(call "")
  if(ARG_ENTRY STREQUAL "main")
    set(call "template <class F>\nint orepa_program_call(F* entry, int argc, char** argv) {\n"
             "  if constexpr (std::is_invocable_v<F*, int, char**>) {\n    return entry(argc, argv);\n"
             "  } else {\n    (void)argc, (void)argv;\n    return entry();\n  }\n}\n\n")
  endif()
  file(CONFIGURE OUTPUT ${dir}/${ARG_LIBRARY}.cpp
       CONTENT "// Generated (cmake/one_tu_programs.cmake): ${ARG_PROGRAMS} ${ARG_SOURCES} as one translation unit.\n${includes}\n${bodies}${call}${adapters}${plain}"
       @ONLY)
  add_library(${ARG_LIBRARY} STATIC ${dir}/${ARG_LIBRARY}.cpp)
  set_target_properties(${ARG_LIBRARY} PROPERTIES UNITY_BUILD OFF)
  target_include_directories(${ARG_LIBRARY} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  target_link_libraries(${ARG_LIBRARY} PUBLIC ${ARG_LINK})
  foreach(name IN LISTS ARG_PROGRAMS)
    add_executable(${name} ${dir}/${name}_main.cpp)
    set_target_properties(${name} PROPERTIES UNITY_BUILD OFF)
    target_link_libraries(${name} PRIVATE ${ARG_LIBRARY} ${ARG_LINK})
  endforeach()
endfunction()
