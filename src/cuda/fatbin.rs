//! Reads the CUDA fat binary container that build.rs embeds for each kernel
//! file: a 16-byte header (magic 0xBA55ED50, version 1, header size, size of
//! what follows) and then one entry per image, each a header of its own
//! (kind, header size, payload size, architecture, flags) followed by the
//! payload. NVIDIA does not document the layout; the fields read here are the
//! ones `fatbinary` from CUDA 12 and 13 writes, and anything that does not add
//! up (sizes past the end, an unknown container version) is rejected.
//!
//! Self-contained on purpose: build.rs includes this file too, to merge and
//! list the images it builds.

use std::ops::Range;

const MAGIC: u32 = 0xBA55_ED50;
const CONTAINER_HEADER: usize = 16;
const ENTRY_HEADER_MIN: usize = 64;
const KIND_PTX: u16 = 1;
const KIND_ELF: u16 = 2;
/// Entry flags that mark a compressed payload: LZ4 (CUDA 11 and later) and
/// the default mode of CUDA 13's `fatbinary`.
const FLAGS_COMPRESSED: u64 = 0x2000 | 0x8000;

/// What an image in a fat binary holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ImageKind {
    /// Machine code (a cubin) for exactly one GPU architecture family member
    /// and the newer minor revisions of it: `sm_90` runs on 9.0, `sm_80` on
    /// 8.0 to 8.9.
    Sass,
    /// PTX for a virtual architecture, which the driver compiles for the GPU
    /// at hand when no SASS fits (any GPU of that compute capability or newer).
    Ptx,
    /// An entry of another kind (the raw kind number).
    Other(u16),
}

/// One image of a fat binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Machine code, PTX or other.
    pub kind: ImageKind,
    /// The architecture as nvcc numbers it: 90 for `sm_90` (SASS) or
    /// `compute_90` (PTX).
    pub arch: u32,
    /// Whether the payload is compressed (the driver inflates it on load).
    pub compressed: bool,
    /// Bytes of the whole entry, header included, within the fat binary.
    pub entry: Range<usize>,
    /// Bytes of the payload (padded) within the fat binary.
    pub payload: Range<usize>,
}

impl Image {
    /// `sm_90`, `compute_80`, or `kind7_90` for an unknown kind.
    pub fn arch_name(&self) -> String {
        match self.kind {
            ImageKind::Sass => format!("sm_{}", self.arch),
            ImageKind::Ptx => format!("compute_{}", self.arch),
            ImageKind::Other(k) => format!("kind{k}_{}", self.arch),
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The range of a fat binary's entries (after its container header).
pub fn entries_range(fatbin: &[u8]) -> Result<Range<usize>, String> {
    let magic = u32_at(fatbin, 0).ok_or("shorter than a fat binary header")?;
    if magic != MAGIC {
        return Err(format!("not a fat binary (magic {magic:#010x})"));
    }
    let version = u16_at(fatbin, 4).ok_or("truncated header")?;
    if version != 1 {
        return Err(format!("unknown fat binary version {version}"));
    }
    let header = usize::from(u16_at(fatbin, 6).ok_or("truncated header")?);
    let body = u64_at(fatbin, 8).ok_or("truncated header")?;
    if header < CONTAINER_HEADER {
        return Err(format!("header size {header} is below {CONTAINER_HEADER}"));
    }
    let end = usize::try_from(body)
        .ok()
        .and_then(|b| header.checked_add(b))
        .filter(|&end| end <= fatbin.len())
        .ok_or_else(|| {
            format!(
                "declares {body} bytes of entries but holds {}",
                fatbin.len().saturating_sub(header)
            )
        })?;
    Ok(header..end)
}

/// Every image of a fat binary, in order.
pub fn images(fatbin: &[u8]) -> Result<Vec<Image>, String> {
    let body = entries_range(fatbin)?;
    let mut at = body.start;
    let mut out = Vec::new();
    while at < body.end {
        let field = |off: usize| format!("entry at byte {at}: truncated at field {off}");
        let kind = u16_at(fatbin, at).ok_or_else(|| field(0))?;
        let header = u32_at(fatbin, at + 4).ok_or_else(|| field(4))? as usize;
        let size = u64_at(fatbin, at + 8).ok_or_else(|| field(8))?;
        if header < ENTRY_HEADER_MIN {
            return Err(format!(
                "entry at byte {at}: header size {header} is too small"
            ));
        }
        let payload_start = at
            .checked_add(header)
            .filter(|&s| s <= body.end)
            .ok_or_else(|| format!("entry at byte {at}: header runs past the end"))?;
        let payload_end = usize::try_from(size)
            .ok()
            .and_then(|s| payload_start.checked_add(s))
            .filter(|&e| e <= body.end)
            .ok_or_else(|| format!("entry at byte {at}: {size}-byte payload runs past the end"))?;
        let arch = u32_at(fatbin, at + 28).ok_or_else(|| field(28))?;
        let flags = u64_at(fatbin, at + 40).ok_or_else(|| field(40))?;
        let inflated = u64_at(fatbin, at + 56).ok_or_else(|| field(56))?;
        out.push(Image {
            kind: match kind {
                KIND_PTX => ImageKind::Ptx,
                KIND_ELF => ImageKind::Sass,
                k => ImageKind::Other(k),
            },
            arch,
            compressed: flags & FLAGS_COMPRESSED != 0 || inflated != 0,
            entry: at..payload_end,
            payload: payload_start..payload_end,
        });
        at = payload_end;
    }
    Ok(out)
}

/// The text of the fat binary's PTX image for `compute_<arch>`, which must be
/// stored uncompressed (build.rs stores it so).
pub fn ptx_text(fatbin: &[u8], arch: u32) -> Result<&str, String> {
    let all = images(fatbin)?;
    let image = all
        .iter()
        .find(|i| i.kind == ImageKind::Ptx && i.arch == arch)
        .ok_or_else(|| format!("no compute_{arch} PTX image"))?;
    if image.compressed {
        return Err(format!("the compute_{arch} PTX image is compressed"));
    }
    let payload = &fatbin[image.payload.clone()];
    // The text ends at the first NUL; the rest is padding.
    let len = payload
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(payload.len());
    std::str::from_utf8(&payload[..len])
        .map_err(|e| format!("the compute_{arch} PTX image is not UTF-8: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry as `fatbinary` lays it out (64-byte header, 8-byte padded payload).
    fn entry(kind: u16, arch: u32, flags: u64, payload: &[u8]) -> Vec<u8> {
        let mut p = payload.to_vec();
        p.resize(payload.len().div_ceil(8) * 8, 0);
        let mut h = vec![0u8; 64];
        h[0..2].copy_from_slice(&kind.to_le_bytes());
        h[2..4].copy_from_slice(&0x0101u16.to_le_bytes());
        h[4..8].copy_from_slice(&64u32.to_le_bytes());
        h[8..16].copy_from_slice(&(p.len() as u64).to_le_bytes());
        h[28..32].copy_from_slice(&arch.to_le_bytes());
        h[40..48].copy_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&p);
        h
    }

    fn container(entries: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = entries.concat();
        let mut f = Vec::new();
        f.extend_from_slice(&MAGIC.to_le_bytes());
        f.extend_from_slice(&1u16.to_le_bytes());
        f.extend_from_slice(&16u16.to_le_bytes());
        f.extend_from_slice(&(body.len() as u64).to_le_bytes());
        f.extend_from_slice(&body);
        f
    }

    #[test]
    fn lists_images_and_reads_the_plain_ptx() {
        let ptx = b"\n.version 9.0\n.target sm_80\n.visible .entry k(\n)\n{\n}\n";
        let f = container(&[
            entry(2, 90, 0x8011, b"compressed elf"),
            entry(1, 80, 0x11, ptx),
        ]);
        let all = images(&f).unwrap();
        let listed: Vec<_> = all.iter().map(|i| (i.kind, i.arch, i.compressed)).collect();
        assert_eq!(
            listed,
            [(ImageKind::Sass, 90, true), (ImageKind::Ptx, 80, false)]
        );
        assert_eq!(all[0].arch_name(), "sm_90");
        assert_eq!(all[1].arch_name(), "compute_80");
        assert_eq!(all[1].entry.end, f.len());
        assert_eq!(ptx_text(&f, 80).unwrap().as_bytes(), ptx);
    }

    #[test]
    fn compressed_or_missing_ptx_is_an_error() {
        let f = container(&[entry(1, 80, 0x2011, b"lz4")]);
        assert!(ptx_text(&f, 80).unwrap_err().contains("compressed"));
        let f = container(&[entry(2, 80, 0x11, b"elf")]);
        assert!(ptx_text(&f, 80).unwrap_err().contains("no compute_80"));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let good = container(&[entry(2, 90, 0, b"elf"), entry(1, 80, 0, b"ptx")]);
        // Every truncation, and every single-byte corruption of the headers.
        for len in 0..good.len() {
            let _ = images(&good[..len]);
        }
        for at in (0..16).chain(16..16 + 64) {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[at] = v;
                let _ = images(&bad);
            }
        }
        assert!(images(b"\x7fELF....")
            .unwrap_err()
            .contains("not a fat binary"));
        let mut short = good.clone();
        short.truncate(good.len() - 1);
        assert!(images(&short).unwrap_err().contains("declares"));
        // A payload size that points past the end.
        let mut over = good.clone();
        over[16 + 8..16 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(images(&over).unwrap_err().contains("past the end"));
    }
}
