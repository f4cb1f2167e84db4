// What the driver reads from a module image: the fatbin container, the PTX
// kernels' signatures and launch bounds, and the sm_90 ELF's resource usage.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace emu {

struct PtxEntry {
    std::string name;
    std::vector<unsigned> param_sizes;  // bytes of each .param, in order
    unsigned max_threads = 0;           // product of .maxntid (0: none)
};

struct ElfKernel {
    int registers = -1;
    int static_smem = 0;
};

struct Image {
    std::string ptx;                      // the PTX text the signatures come from
    unsigned ptx_arch = 0;                // e.g. 80 for compute_80
    std::vector<unsigned> elf_archs;      // SASS the image carries, e.g. {80, 90, 100}
    std::map<std::string, ElfKernel> sm90;  // from the sm_90 ELF, when present
    std::vector<PtxEntry> entries;
};

// Parses what cuModuleLoadData was given: NUL-terminated PTX text, or a fatbin
// (as nvcc -fatbin writes it). Returns false with a reason when the image
// cannot be used (no PTX to check signatures against, compressed PTX...).
bool parse_image(const void* data, Image& out, std::string& why);

// The .entry declarations of PTX text.
std::vector<PtxEntry> parse_ptx_entries(const std::string& ptx);

}  // namespace emu
