//! The PTX that build.rs compiled from `kernels/*.cu`, embedded as text.

include!(concat!(env!("OUT_DIR"), "/ptx.rs"));

/// The `.entry` names declared in a PTX module, in order.
pub fn entry_points(ptx: &str) -> impl Iterator<Item = &str> {
    ptx.lines().filter_map(|line| {
        let rest = line.trim_start().strip_prefix(".visible .entry ")?;
        let end = rest.find('(').unwrap_or(rest.len());
        Some(rest[..end].trim())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn entry_points_are_parsed() {
        let ptx = ".visible .entry foo(\n .param .u64 a\n)\n{\n}\n.visible .entry bar_f32(\n)";
        let names: Vec<_> = super::entry_points(ptx).collect();
        assert_eq!(names, ["foo", "bar_f32"]);
    }
}
