#include "image.hpp"

#include <cstring>

namespace emu {

namespace {

const uint32_t kFatbinMagic = 0xBA55ED50u;
const uint16_t kKindPtx = 1, kKindElf = 2;
// Entry flags that mark a compressed payload (older and newer nvcc).
const uint64_t kCompressed = 0x2000 | 0x8000;

template <typename T>
T rd(const unsigned char* p) {
    T v;
    memcpy(&v, p, sizeof v);
    return v;
}

unsigned type_size(const std::string& t) {
    if (t == ".u8" || t == ".s8" || t == ".b8") return 1;
    if (t == ".u16" || t == ".s16" || t == ".b16" || t == ".f16") return 2;
    if (t == ".u32" || t == ".s32" || t == ".b32" || t == ".f32") return 4;
    if (t == ".u64" || t == ".s64" || t == ".b64" || t == ".f64") return 8;
    return 0;
}

// One ".param ..." declaration: its size in bytes.
unsigned param_size(const std::string& decl) {
    unsigned elem = 0, count = 1;
    size_t i = 0;
    while (i < decl.size()) {
        while (i < decl.size() && isspace((unsigned char)decl[i])) i++;
        size_t j = i;
        while (j < decl.size() && !isspace((unsigned char)decl[j])) j++;
        std::string tok = decl.substr(i, j - i);
        if (unsigned s = type_size(tok)) elem = s;
        size_t br = tok.find('[');
        if (br != std::string::npos && tok[0] != '.') count = (unsigned)strtoul(tok.c_str() + br + 1, nullptr, 10);
        i = j;
    }
    return elem * count;
}

// Section headers of an ELF64 cubin: registers from .text.<kernel> (sh_info's
// top byte, as cuobjdump reads it), static shared memory from .nv.shared.<kernel>.
void parse_cubin(const unsigned char* p, size_t n, std::map<std::string, ElfKernel>& out) {
    if (n < 64 || memcmp(p, "\x7f" "ELF", 4) != 0 || p[4] != 2) return;
    const uint64_t shoff = rd<uint64_t>(p + 0x28);
    const uint16_t shentsize = rd<uint16_t>(p + 0x3a), shnum = rd<uint16_t>(p + 0x3c),
                   shstrndx = rd<uint16_t>(p + 0x3e);
    if (shentsize < 64 || shoff + (uint64_t)shnum * shentsize > n || shstrndx >= shnum) return;
    auto sh = [&](unsigned i) { return p + shoff + (uint64_t)i * shentsize; };
    const uint64_t stroff = rd<uint64_t>(sh(shstrndx) + 0x18), strsize = rd<uint64_t>(sh(shstrndx) + 0x20);
    if (stroff + strsize > n) return;
    for (unsigned i = 0; i < shnum; i++) {
        const uint32_t name = rd<uint32_t>(sh(i));
        if (name >= strsize) continue;
        const char* nm = reinterpret_cast<const char*>(p + stroff + name);
        if (strncmp(nm, ".text.", 6) == 0) {
            out[nm + 6].registers = (int)(rd<uint32_t>(sh(i) + 0x2c) >> 24);
        } else if (strncmp(nm, ".nv.shared.", 11) == 0) {
            out[nm + 11].static_smem = (int)rd<uint64_t>(sh(i) + 0x20);
        }
    }
}

}  // namespace

std::vector<PtxEntry> parse_ptx_entries(const std::string& ptx) {
    std::vector<PtxEntry> entries;
    size_t pos = 0;
    while ((pos = ptx.find(".entry", pos)) != std::string::npos) {
        size_t i = pos + 6;
        pos = i;
        if (i >= ptx.size() || !isspace((unsigned char)ptx[i])) continue;
        while (i < ptx.size() && isspace((unsigned char)ptx[i])) i++;
        size_t j = i;
        while (j < ptx.size() && (isalnum((unsigned char)ptx[j]) || ptx[j] == '_' || ptx[j] == '$')) j++;
        PtxEntry e;
        e.name = ptx.substr(i, j - i);
        while (j < ptx.size() && isspace((unsigned char)ptx[j])) j++;
        if (j < ptx.size() && ptx[j] == '(') {
            size_t close = ptx.find(')', j);
            if (close == std::string::npos) break;
            std::string params = ptx.substr(j + 1, close - j - 1);
            size_t k = 0;
            while (k < params.size()) {
                size_t comma = params.find(',', k);
                if (comma == std::string::npos) comma = params.size();
                std::string decl = params.substr(k, comma - k);
                if (decl.find(".param") != std::string::npos) e.param_sizes.push_back(param_size(decl));
                k = comma + 1;
            }
            j = close + 1;
        }
        // Performance directives between the parameter list and the body.
        size_t body = ptx.find('{', j);
        std::string dirs = ptx.substr(j, body == std::string::npos ? 0 : body - j);
        size_t m = dirs.find(".maxntid");
        if (m != std::string::npos) {
            unsigned x = 1, y = 1, z = 1;
            sscanf(dirs.c_str() + m + 8, " %u , %u , %u", &x, &y, &z);
            e.max_threads = x * y * z;
        }
        entries.push_back(e);
        pos = j;
    }
    return entries;
}

bool parse_image(const void* data, Image& out, std::string& why) {
    const unsigned char* p = static_cast<const unsigned char*>(data);
    if (rd<uint32_t>(p) != kFatbinMagic) {
        // PTX text, NUL-terminated (what cuModuleLoadData takes).
        const char* s = static_cast<const char*>(data);
        out.ptx.assign(s, strnlen(s, 1u << 30));
        if (out.ptx.find(".version") == std::string::npos) {
            why = "neither a fatbin nor PTX text";
            return false;
        }
        size_t t = out.ptx.find(".target sm_");
        if (t != std::string::npos) out.ptx_arch = (unsigned)strtoul(out.ptx.c_str() + t + 11, nullptr, 10);
        out.entries = parse_ptx_entries(out.ptx);
        return true;
    }
    const uint16_t header = rd<uint16_t>(p + 6);
    const uint64_t size = rd<uint64_t>(p + 8);
    uint64_t off = header;
    bool compressed_ptx = false;
    while (off + 64 <= header + size) {
        const unsigned char* e = p + off;
        const uint16_t kind = rd<uint16_t>(e);
        const uint32_t ehs = rd<uint32_t>(e + 4);
        const uint64_t len = rd<uint64_t>(e + 8);
        const uint32_t arch = rd<uint32_t>(e + 0x1c);
        const uint64_t flags = rd<uint64_t>(e + 0x28);
        const unsigned char* payload = e + ehs;
        if (kind == kKindPtx) {
            if (flags & kCompressed) {
                compressed_ptx = true;
            } else if (out.ptx.empty() || arch < out.ptx_arch) {
                const char* s = reinterpret_cast<const char*>(payload);
                out.ptx.assign(s, strnlen(s, len));
                out.ptx_arch = arch;
            }
        } else if (kind == kKindElf) {
            out.elf_archs.push_back(arch);
            if (arch == 90 && !(flags & kCompressed)) parse_cubin(payload, len, out.sm90);
        }
        off += ehs + len;
    }
    if (out.ptx.empty()) {
        why = compressed_ptx
                  ? "its PTX is compressed: the emulator checks kernel signatures against the PTX, "
                    "so build the fatbin with nvcc --no-compress (fatbinary --compress=false)"
                  : "the fatbin carries no PTX to check kernel signatures against";
        return false;
    }
    out.entries = parse_ptx_entries(out.ptx);
    return true;
}

}  // namespace emu
