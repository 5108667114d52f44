//! Recording what the probe captures: the TS packets to a .ts file, the
//! UDP datagrams to a pcap file (Ethernet/IPv4/UDP framing, so Wireshark,
//! tshark and TSDuck open it).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::SocketAddrV4;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::{DataLink, Endianness, TsResolution};

use crate::net;

pub struct TsWriter {
    out: BufWriter<File>,
    path: String,
}

impl TsWriter {
    pub fn create(path: &Path) -> anyhow::Result<TsWriter> {
        let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TsWriter {
            out: BufWriter::with_capacity(1 << 16, f),
            path: path.display().to_string(),
        })
    }
    pub fn packet(&mut self, p: &[u8]) -> anyhow::Result<()> {
        self.out
            .write_all(p)
            .with_context(|| format!("writing {}", self.path))
    }
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path))
    }
}

pub struct PcapOut {
    w: PcapWriter<BufWriter<File>>,
    path: String,
    ip_id: u16,
}

impl PcapOut {
    pub fn create(path: &Path) -> anyhow::Result<PcapOut> {
        let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let header = PcapHeader {
            version_major: 2,
            version_minor: 4,
            ts_correction: 0,
            ts_accuracy: 0,
            snaplen: 65_535,
            datalink: DataLink::ETHERNET,
            ts_resolution: TsResolution::MicroSecond,
            endianness: Endianness::Little,
        };
        let w = PcapWriter::with_header(BufWriter::with_capacity(1 << 16, f), header)
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
        Ok(PcapOut {
            w,
            path: path.display().to_string(),
            ip_id: 0,
        })
    }

    /// One datagram at `time` (unix seconds).
    pub fn datagram(
        &mut self,
        time: f64,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        self.ip_id = self.ip_id.wrapping_add(1);
        let frame = net::ethernet_frame(src, dst, payload, self.ip_id);
        let ts = Duration::from_micros((time.max(0.0) * 1e6).round() as u64);
        let pkt = PcapPacket::new(ts, frame.len() as u32, &frame);
        self.w
            .write_packet(&pkt)
            .map_err(|e| anyhow!("writing {}: {e}", self.path))?;
        Ok(())
    }

    pub fn finish(self) -> anyhow::Result<()> {
        let path = self.path.clone();
        self.w
            .into_writer()
            .flush()
            .with_context(|| format!("writing {path}"))
    }
}
