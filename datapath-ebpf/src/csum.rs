//! Internet checksum of the IPv4 headers the programs write.
use network_types::ip::Ipv4Hdr;

/// Returns the header checksum of `hdr` (whose `check` field must be zero), in wire order.
#[inline(always)]
pub fn ipv4_header(hdr: &Ipv4Hdr) -> [u8; 2] {
    // SAFETY: Ipv4Hdr is 20 bytes of plain data; read as ten big-endian words.
    let words = unsafe { &*(hdr as *const Ipv4Hdr as *const [[u8; 2]; 10]) };
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 10 {
        sum += u16::from_be_bytes(words[i]) as u32;
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}
