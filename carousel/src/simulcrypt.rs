//! DVB SimulCrypt EMMG/PDG ⇔ MUX messages (ETSI TS 103 197, clause 6):
//! the one codec for casd's SimulCrypt output and the MUX simulator in
//! `casd-probe`.
//!
//! A message is a 5-byte header (`protocol_version`, `message_type`,
//! `message_length`, big-endian) followed by TLV parameters
//! (`parameter_type`, `parameter_length`, value). [`Message::parse`] turns
//! one whole message into a typed [`Message`] after checking, against the
//! table of TS 103 197 for its type, that every parameter is known, has its
//! length and appears as often as allowed; datagrams stay borrowed slices
//! of the input. A message that fails gets a [`ParseError`] carrying the
//! spec's [`ErrorStatus`] for the channel_error / stream_error to send back.
//!
//! Versions: the EMMG ⇔ MUX messages and parameters are the same in
//! protocol versions 2 and 3; only the header byte differs, and a message
//! with another version than the connection's is refused with
//! [`ErrorStatus::UnsupportedProtocolVersion`].

use std::fmt;

/// Bytes of the message header.
pub const HEADER_LEN: usize = 5;
/// Bytes of a parameter's type and length.
pub const PARAM_HEADER_LEN: usize = 4;
/// Protocol versions casd speaks (2 is the default).
pub const VERSIONS: [u8; 2] = [2, 3];
/// data_type of EMMs (TS 103 197 §6.2.3: 0x00 EMM, 0x01 private data,
/// 0x02 DSM-CC).
pub const DATA_TYPE_EMM: u8 = 0x00;

macro_rules! codes {
    ($(#[$m:meta])* $name:ident { $($v:ident = $code:literal, $text:literal;)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($v,)* }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v,)*];
            pub fn code(self) -> u16 {
                match self { $($name::$v => $code,)* }
            }
            pub fn from_code(code: u16) -> Option<$name> {
                match code { $($code => Some($name::$v),)* _ => None }
            }
            /// The name TS 103 197 gives it.
            pub fn name(self) -> &'static str {
                match self { $($name::$v => $text,)* }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

codes! {
    /// message_type values of the EMMG/PDG ⇔ MUX interface (Table 3).
    MessageType {
        ChannelSetup = 0x0011, "channel_setup";
        ChannelTest = 0x0012, "channel_test";
        ChannelStatus = 0x0013, "channel_status";
        ChannelClose = 0x0014, "channel_close";
        ChannelError = 0x0015, "channel_error";
        StreamSetup = 0x0111, "stream_setup";
        StreamTest = 0x0112, "stream_test";
        StreamStatus = 0x0113, "stream_status";
        StreamCloseRequest = 0x0114, "stream_close_request";
        StreamCloseResponse = 0x0115, "stream_close_response";
        StreamError = 0x0116, "stream_error";
        StreamBwRequest = 0x0117, "stream_BW_request";
        StreamBwAllocation = 0x0118, "stream_BW_allocation";
        DataProvision = 0x0211, "data_provision";
    }
}

codes! {
    /// parameter_type values of the EMMG/PDG ⇔ MUX interface (Table 7).
    ParamType {
        ClientId = 0x0001, "client_id";
        SectionTsPktFlag = 0x0002, "section_TSpkt_flag";
        DataChannelId = 0x0003, "data_channel_id";
        DataStreamId = 0x0004, "data_stream_id";
        Datagram = 0x0005, "datagram";
        Bandwidth = 0x0006, "bandwidth";
        DataType = 0x0007, "data_type";
        DataId = 0x0008, "data_id";
        ErrorStatus = 0x7000, "error_status";
        ErrorInformation = 0x7001, "error_information";
    }
}

codes! {
    /// error_status values of the EMMG/PDG ⇔ MUX interface (Table 8).
    ErrorStatus {
        InvalidMessage = 0x0001, "invalid message";
        UnsupportedProtocolVersion = 0x0002, "unsupported protocol version";
        UnknownMessageType = 0x0003, "unknown message_type value";
        MessageTooLong = 0x0004, "message too long";
        UnknownDataStreamId = 0x0005, "unknown data_stream_id value";
        UnknownDataChannelId = 0x0006, "unknown data_channel_id value";
        TooManyChannelsOnMux = 0x0007, "too many channels on this MUX";
        TooManyStreamsOnChannel = 0x0008, "too many data streams on this channel";
        TooManyStreamsOnMux = 0x0009, "too many data streams on this MUX";
        UnknownParameterType = 0x000A, "unknown parameter_type";
        InconsistentLength = 0x000B, "inconsistent length for DVB parameter";
        MissingParameter = 0x000C, "missing mandatory DVB parameter";
        InvalidValue = 0x000D, "invalid value for DVB parameter";
        UnknownClientId = 0x000E, "unknown client_id value";
        ExceededBandwidth = 0x000F, "exceeded bandwidth";
        UnknownDataId = 0x0010, "unknown data_id value";
        DataChannelIdInUse = 0x0011, "data_channel_id value already in use";
        DataStreamIdInUse = 0x0012, "data_stream_id value already in use";
        DataIdInUse = 0x0013, "data_id value already in use";
        ClientIdInUse = 0x0014, "client_id value already in use";
        UnknownError = 0x7000, "unknown error";
        UnrecoverableError = 0x7001, "unrecoverable error";
    }
}

/// An error_status as received: its name when the code is one of Table 8.
pub fn error_name(code: u16) -> String {
    match ErrorStatus::from_code(code) {
        Some(e) => format!("{} (0x{code:04X})", e.name()),
        None => format!("0x{code:04X} (not in TS 103 197)"),
    }
}

/// The identifiers of a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Channel {
    /// CA_system_ID in the top 16 bits, CA_subsystem_ID below.
    pub client_id: u32,
    pub data_channel_id: u16,
}

/// The identifiers of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream {
    pub channel: Channel,
    pub data_stream_id: u16,
}

/// One EMMG/PDG ⇔ MUX message; datagrams and error_information borrow the
/// parsed bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    ChannelSetup {
        channel: Channel,
        ts_packets: bool,
    },
    ChannelTest(Channel),
    ChannelStatus {
        channel: Channel,
        ts_packets: bool,
    },
    ChannelClose(Channel),
    ChannelError {
        channel: Channel,
        errors: Vec<u16>,
        info: Vec<&'a [u8]>,
    },
    StreamSetup {
        stream: Stream,
        data_id: u16,
        data_type: u8,
    },
    StreamTest(Stream),
    StreamStatus {
        stream: Stream,
        data_id: u16,
        data_type: u8,
    },
    StreamCloseRequest(Stream),
    StreamCloseResponse(Stream),
    StreamError {
        stream: Stream,
        errors: Vec<u16>,
        info: Vec<&'a [u8]>,
    },
    /// bandwidth in kbit/s.
    StreamBwRequest {
        stream: Stream,
        bandwidth: Option<u16>,
    },
    /// bandwidth in kbit/s.
    StreamBwAllocation {
        stream: Stream,
        bandwidth: Option<u16>,
    },
    /// data_channel_id and data_stream_id are optional on the wire (UDP
    /// data path of version 1); casd always sends them.
    DataProvision {
        client_id: u32,
        data_channel_id: Option<u16>,
        data_stream_id: Option<u16>,
        data_id: u16,
        datagrams: Vec<&'a [u8]>,
    },
}

/// Why a message was refused, with the status to answer it with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {detail}")]
pub struct ParseError {
    pub status: ErrorStatus,
    pub detail: String,
    /// The message_type, when the header could be read.
    pub message_type: Option<u16>,
}

fn fail(status: ErrorStatus, message_type: Option<u16>, detail: String) -> ParseError {
    ParseError {
        status,
        detail,
        message_type,
    }
}

/// (parameter, value length range, most occurrences, mandatory).
type Rule = (ParamType, (usize, usize), usize, bool);

const VAR: (usize, usize) = (0, 0xFFFF);
const CLIENT: Rule = (ParamType::ClientId, (4, 4), 1, true);
const CHANNEL: Rule = (ParamType::DataChannelId, (2, 2), 1, true);
const STREAM: Rule = (ParamType::DataStreamId, (2, 2), 1, true);
const FLAG: Rule = (ParamType::SectionTsPktFlag, (1, 1), 1, true);
const DATA_ID: Rule = (ParamType::DataId, (2, 2), 1, true);
const DATA_TYPE: Rule = (ParamType::DataType, (1, 1), 1, true);
const BANDWIDTH: Rule = (ParamType::Bandwidth, (2, 2), 1, false);
const STATUS: Rule = (ParamType::ErrorStatus, (2, 2), usize::MAX, true);
const INFO: Rule = (ParamType::ErrorInformation, VAR, usize::MAX, false);

/// TS 103 197's parameter table of each message.
fn rules(t: MessageType) -> &'static [Rule] {
    use MessageType as M;
    match t {
        M::ChannelSetup | M::ChannelStatus => &[CLIENT, CHANNEL, FLAG],
        M::ChannelTest | M::ChannelClose => &[CLIENT, CHANNEL],
        M::ChannelError => &[CLIENT, CHANNEL, STATUS, INFO],
        M::StreamSetup | M::StreamStatus => &[CLIENT, CHANNEL, STREAM, DATA_ID, DATA_TYPE],
        M::StreamTest | M::StreamCloseRequest | M::StreamCloseResponse => {
            &[CLIENT, CHANNEL, STREAM]
        }
        M::StreamError => &[CLIENT, CHANNEL, STREAM, STATUS, INFO],
        M::StreamBwRequest | M::StreamBwAllocation => &[CLIENT, CHANNEL, STREAM, BANDWIDTH],
        M::DataProvision => &[
            CLIENT,
            (ParamType::DataChannelId, (2, 2), 1, false),
            (ParamType::DataStreamId, (2, 2), 1, false),
            DATA_ID,
            (ParamType::Datagram, VAR, usize::MAX, true),
        ],
    }
}

/// The total length (header included) a message header announces, once
/// `header` holds at least [`HEADER_LEN`] bytes.
pub fn frame_len(header: &[u8]) -> Option<usize> {
    let len = header.get(3..5)?;
    Some(HEADER_LEN + usize::from(u16::from_be_bytes([len[0], len[1]])))
}

/// The parameters of one message, checked against its table; values
/// grouped by the rule they matched.
struct Params<'a> {
    values: Vec<(ParamType, &'a [u8])>,
}

impl<'a> Params<'a> {
    fn check(t: MessageType, mut body: &'a [u8]) -> Result<Params<'a>, ParseError> {
        let code = Some(t.code());
        let table = rules(t);
        let mut values = Vec::new();
        while !body.is_empty() {
            let (Some(h), rest) = (body.get(..PARAM_HEADER_LEN), body.get(PARAM_HEADER_LEN..))
            else {
                return Err(fail(
                    ErrorStatus::InvalidMessage,
                    code,
                    format!("{t}: {} stray bytes after the last parameter", body.len()),
                ));
            };
            let ptype = u16::from_be_bytes([h[0], h[1]]);
            let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
            let rest = rest.unwrap_or_default();
            let Some(value) = rest.get(..len) else {
                return Err(fail(
                    ErrorStatus::InconsistentLength,
                    code,
                    format!(
                        "{t}: parameter 0x{ptype:04X} claims {len} bytes, {} left",
                        rest.len()
                    ),
                ));
            };
            let rule = ParamType::from_code(ptype)
                .and_then(|p| table.iter().find(|r| r.0 == p))
                .ok_or_else(|| {
                    fail(
                        ErrorStatus::UnknownParameterType,
                        code,
                        format!("{t}: parameter_type 0x{ptype:04X} does not belong here"),
                    )
                })?;
            if len < rule.1 .0 || len > rule.1 .1 {
                return Err(fail(
                    ErrorStatus::InconsistentLength,
                    code,
                    format!("{t}: {} of {len} bytes (expected {})", rule.0, rule.1 .0),
                ));
            }
            values.push((rule.0, value));
            body = &rest[len..];
        }
        for &(p, _, most, mandatory) in table {
            let n = values.iter().filter(|v| v.0 == p).count();
            if n == 0 && mandatory {
                return Err(fail(
                    ErrorStatus::MissingParameter,
                    code,
                    format!("{t}: no {p}"),
                ));
            }
            if n > most {
                return Err(fail(
                    ErrorStatus::InvalidMessage,
                    code,
                    format!("{t}: {p} {n} times"),
                ));
            }
        }
        Ok(Params { values })
    }

    fn all(&self, p: ParamType) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.values.iter().filter(move |v| v.0 == p).map(|v| v.1)
    }
    fn get(&self, p: ParamType) -> Option<&'a [u8]> {
        self.all(p).next()
    }
    fn u8(&self, p: ParamType) -> u8 {
        self.get(p).map_or(0, |v| v[0])
    }
    fn u16(&self, p: ParamType) -> Option<u16> {
        self.get(p).map(|v| u16::from_be_bytes([v[0], v[1]]))
    }
    fn u32(&self, p: ParamType) -> u32 {
        self.get(p)
            .map_or(0, |v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }
    fn channel(&self) -> Channel {
        Channel {
            client_id: self.u32(ParamType::ClientId),
            data_channel_id: self.u16(ParamType::DataChannelId).unwrap_or(0),
        }
    }
    fn stream(&self) -> Stream {
        Stream {
            channel: self.channel(),
            data_stream_id: self.u16(ParamType::DataStreamId).unwrap_or(0),
        }
    }
    fn flag(&self, t: MessageType) -> Result<bool, ParseError> {
        match self.u8(ParamType::SectionTsPktFlag) {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(fail(
                ErrorStatus::InvalidValue,
                Some(t.code()),
                format!("{t}: section_TSpkt_flag {v}"),
            )),
        }
    }
    fn errors(&self) -> Vec<u16> {
        self.all(ParamType::ErrorStatus)
            .map(|v| u16::from_be_bytes([v[0], v[1]]))
            .collect()
    }
}

impl<'a> Message<'a> {
    /// Parses one whole message (`bytes` = header + body, nothing more)
    /// sent with protocol version `version`.
    pub fn parse(bytes: &'a [u8], version: u8) -> Result<Message<'a>, ParseError> {
        let Some(h) = bytes.get(..HEADER_LEN) else {
            return Err(fail(
                ErrorStatus::InvalidMessage,
                None,
                format!("{} bytes, shorter than a header", bytes.len()),
            ));
        };
        let raw = u16::from_be_bytes([h[1], h[2]]);
        if h[0] != version {
            return Err(fail(
                ErrorStatus::UnsupportedProtocolVersion,
                Some(raw),
                format!(
                    "protocol_version {} on a version {version} connection",
                    h[0]
                ),
            ));
        }
        let t = MessageType::from_code(raw).ok_or_else(|| {
            fail(
                ErrorStatus::UnknownMessageType,
                Some(raw),
                format!("message_type 0x{raw:04X}"),
            )
        })?;
        if frame_len(h) != Some(bytes.len()) {
            return Err(fail(
                ErrorStatus::InvalidMessage,
                Some(raw),
                format!(
                    "{t}: message_length says {} bytes, got {}",
                    frame_len(h).unwrap_or(0) - HEADER_LEN,
                    bytes.len() - HEADER_LEN
                ),
            ));
        }
        let p = Params::check(t, &bytes[HEADER_LEN..])?;
        Self::typed(t, &p)
    }

    fn typed(t: MessageType, p: &Params<'a>) -> Result<Message<'a>, ParseError> {
        use MessageType as M;
        use ParamType as P;
        let data = |p: &Params<'a>| (p.u16(P::DataId).unwrap_or(0), p.u8(P::DataType));
        Ok(match t {
            M::ChannelSetup => Message::ChannelSetup {
                channel: p.channel(),
                ts_packets: p.flag(t)?,
            },
            M::ChannelStatus => Message::ChannelStatus {
                channel: p.channel(),
                ts_packets: p.flag(t)?,
            },
            M::ChannelTest => Message::ChannelTest(p.channel()),
            M::ChannelClose => Message::ChannelClose(p.channel()),
            M::ChannelError => Message::ChannelError {
                channel: p.channel(),
                errors: p.errors(),
                info: p.all(P::ErrorInformation).collect(),
            },
            M::StreamSetup | M::StreamStatus => {
                let (data_id, data_type) = data(p);
                if data_type > 2 {
                    return Err(fail(
                        ErrorStatus::InvalidValue,
                        Some(t.code()),
                        format!("{t}: data_type {data_type}"),
                    ));
                }
                let stream = p.stream();
                if t == M::StreamSetup {
                    Message::StreamSetup {
                        stream,
                        data_id,
                        data_type,
                    }
                } else {
                    Message::StreamStatus {
                        stream,
                        data_id,
                        data_type,
                    }
                }
            }
            M::StreamTest => Message::StreamTest(p.stream()),
            M::StreamCloseRequest => Message::StreamCloseRequest(p.stream()),
            M::StreamCloseResponse => Message::StreamCloseResponse(p.stream()),
            M::StreamError => Message::StreamError {
                stream: p.stream(),
                errors: p.errors(),
                info: p.all(P::ErrorInformation).collect(),
            },
            M::StreamBwRequest => Message::StreamBwRequest {
                stream: p.stream(),
                bandwidth: p.u16(P::Bandwidth),
            },
            M::StreamBwAllocation => Message::StreamBwAllocation {
                stream: p.stream(),
                bandwidth: p.u16(P::Bandwidth),
            },
            M::DataProvision => Message::DataProvision {
                client_id: p.u32(P::ClientId),
                data_channel_id: p.u16(P::DataChannelId),
                data_stream_id: p.u16(P::DataStreamId),
                data_id: data(p).0,
                datagrams: p.all(P::Datagram).collect(),
            },
        })
    }

    pub fn message_type(&self) -> MessageType {
        use MessageType as M;
        match self {
            Message::ChannelSetup { .. } => M::ChannelSetup,
            Message::ChannelTest(_) => M::ChannelTest,
            Message::ChannelStatus { .. } => M::ChannelStatus,
            Message::ChannelClose(_) => M::ChannelClose,
            Message::ChannelError { .. } => M::ChannelError,
            Message::StreamSetup { .. } => M::StreamSetup,
            Message::StreamTest(_) => M::StreamTest,
            Message::StreamStatus { .. } => M::StreamStatus,
            Message::StreamCloseRequest(_) => M::StreamCloseRequest,
            Message::StreamCloseResponse(_) => M::StreamCloseResponse,
            Message::StreamError { .. } => M::StreamError,
            Message::StreamBwRequest { .. } => M::StreamBwRequest,
            Message::StreamBwAllocation { .. } => M::StreamBwAllocation,
            Message::DataProvision { .. } => M::DataProvision,
        }
    }

    /// Appends the message in `version` to `out`. Fails only when the
    /// body (or a parameter) would not fit its 16-bit length.
    pub fn encode(&self, version: u8, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        out.push(version);
        out.extend_from_slice(&self.message_type().code().to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        let written = self.write_params(&mut Writer(&mut *out));
        let body = out.len() - start - HEADER_LEN;
        let len = written.and_then(|()| u16::try_from(body).map_err(|_| EncodeError(body)));
        let len = len.inspect_err(|_| out.truncate(start))?;
        out[start + 3..start + 5].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    fn write_params(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        use ParamType as P;
        let ch = |w: &mut Writer<'_>, c: &Channel| {
            w.put(P::ClientId, &c.client_id.to_be_bytes())?;
            w.put(P::DataChannelId, &c.data_channel_id.to_be_bytes())
        };
        let st = |w: &mut Writer<'_>, s: &Stream| {
            ch(w, &s.channel)?;
            w.put(P::DataStreamId, &s.data_stream_id.to_be_bytes())
        };
        let errs = |w: &mut Writer<'_>, errors: &[u16], info: &[&[u8]]| {
            for e in errors {
                w.put(P::ErrorStatus, &e.to_be_bytes())?;
            }
            info.iter().try_for_each(|i| w.put(P::ErrorInformation, i))
        };
        match self {
            Message::ChannelSetup {
                channel,
                ts_packets,
            }
            | Message::ChannelStatus {
                channel,
                ts_packets,
            } => {
                ch(w, channel)?;
                w.put(P::SectionTsPktFlag, &[u8::from(*ts_packets)])
            }
            Message::ChannelTest(c) | Message::ChannelClose(c) => ch(w, c),
            Message::ChannelError {
                channel,
                errors,
                info,
            } => {
                ch(w, channel)?;
                errs(w, errors, info)
            }
            Message::StreamSetup {
                stream,
                data_id,
                data_type,
            }
            | Message::StreamStatus {
                stream,
                data_id,
                data_type,
            } => {
                st(w, stream)?;
                w.put(P::DataId, &data_id.to_be_bytes())?;
                w.put(P::DataType, &[*data_type])
            }
            Message::StreamTest(s)
            | Message::StreamCloseRequest(s)
            | Message::StreamCloseResponse(s) => st(w, s),
            Message::StreamError {
                stream,
                errors,
                info,
            } => {
                st(w, stream)?;
                errs(w, errors, info)
            }
            Message::StreamBwRequest { stream, bandwidth }
            | Message::StreamBwAllocation { stream, bandwidth } => {
                st(w, stream)?;
                bandwidth.map_or(Ok(()), |b| w.put(P::Bandwidth, &b.to_be_bytes()))
            }
            Message::DataProvision { .. } => self.write_data_provision(w),
        }
    }
}

impl Message<'_> {
    fn write_data_provision(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        use ParamType as P;
        let Message::DataProvision {
            client_id,
            data_channel_id,
            data_stream_id,
            data_id,
            datagrams,
        } = self
        else {
            return Ok(());
        };
        w.put(P::ClientId, &client_id.to_be_bytes())?;
        if let Some(c) = data_channel_id {
            w.put(P::DataChannelId, &c.to_be_bytes())?;
        }
        if let Some(s) = data_stream_id {
            w.put(P::DataStreamId, &s.to_be_bytes())?;
        }
        w.put(P::DataId, &data_id.to_be_bytes())?;
        datagrams.iter().try_for_each(|d| w.put(P::Datagram, d))
    }
}

/// A body or parameter longer than 65535 bytes (the length given).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0} bytes do not fit a 16-bit SimulCrypt length")]
pub struct EncodeError(pub usize);

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn put(&mut self, p: ParamType, value: &[u8]) -> Result<(), EncodeError> {
        let len = u16::try_from(value.len()).map_err(|_| EncodeError(value.len()))?;
        self.0.extend_from_slice(&p.code().to_be_bytes());
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(value);
        Ok(())
    }
}

/// Why no message could be read from a stream.
#[cfg(feature = "player")]
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed the connection between two messages.
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The header announces more than the reader accepts: the body is not
    /// read (answer [`ErrorStatus::MessageTooLong`] and close).
    #[error(
        "message_type 0x{message_type:04X} announces {len} bytes, more than the {max} accepted"
    )]
    TooLong {
        message_type: u16,
        len: usize,
        max: usize,
    },
}

/// Reads one whole message (header + body) into `buf`, refusing bodies
/// longer than `max` bytes before reading them: memory stays bounded
/// whatever the peer announces.
#[cfg(feature = "player")]
pub async fn read_message<R>(r: &mut R, buf: &mut Vec<u8>, max: usize) -> Result<(), ReadError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    buf.clear();
    buf.resize(HEADER_LEN, 0);
    match r.read_exact(buf).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ReadError::Closed),
        Err(e) => return Err(e.into()),
    }
    let total = frame_len(buf).unwrap_or(HEADER_LEN);
    if total - HEADER_LEN > max {
        return Err(ReadError::TooLong {
            message_type: u16::from_be_bytes([buf[1], buf[2]]),
            len: total - HEADER_LEN,
            max,
        });
    }
    buf.resize(total, 0);
    r.read_exact(&mut buf[HEADER_LEN..]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CH: Channel = Channel {
        client_id: 0x4AFF_0001,
        data_channel_id: 7,
    };
    const ST: Stream = Stream {
        channel: CH,
        data_stream_id: 9,
    };

    fn enc(m: &Message<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        m.encode(2, &mut v).unwrap();
        v
    }

    #[test]
    fn channel_setup_bytes_and_round_trip() {
        let m = Message::ChannelSetup {
            channel: CH,
            ts_packets: true,
        };
        let b = enc(&m);
        assert_eq!(
            b,
            [
                2, 0x00, 0x11, 0, 19, //
                0, 1, 0, 4, 0x4A, 0xFF, 0, 1, //
                0, 3, 0, 2, 0, 7, //
                0, 2, 0, 1, 1
            ]
        );
        assert_eq!(Message::parse(&b, 2).unwrap(), m);
    }

    #[test]
    fn every_message_round_trips_in_both_versions() {
        let dg: &[u8] = &[0x47; 188];
        let all = [
            Message::ChannelSetup {
                channel: CH,
                ts_packets: false,
            },
            Message::ChannelTest(CH),
            Message::ChannelStatus {
                channel: CH,
                ts_packets: true,
            },
            Message::ChannelClose(CH),
            Message::ChannelError {
                channel: CH,
                errors: vec![0x000F, 0x7000],
                info: vec![b"x"],
            },
            Message::StreamSetup {
                stream: ST,
                data_id: 3,
                data_type: DATA_TYPE_EMM,
            },
            Message::StreamTest(ST),
            Message::StreamStatus {
                stream: ST,
                data_id: 3,
                data_type: 0,
            },
            Message::StreamCloseRequest(ST),
            Message::StreamCloseResponse(ST),
            Message::StreamError {
                stream: ST,
                errors: vec![1],
                info: vec![],
            },
            Message::StreamBwRequest {
                stream: ST,
                bandwidth: Some(500),
            },
            Message::StreamBwAllocation {
                stream: ST,
                bandwidth: None,
            },
            Message::DataProvision {
                client_id: CH.client_id,
                data_channel_id: Some(7),
                data_stream_id: Some(9),
                data_id: 3,
                datagrams: vec![dg, dg],
            },
        ];
        assert_eq!(all.len(), MessageType::ALL.len());
        for v in VERSIONS {
            for m in &all {
                let mut b = Vec::new();
                m.encode(v, &mut b).unwrap();
                assert_eq!(Message::parse(&b, v).as_ref(), Ok(m), "{m:?}");
                let other = if v == 2 { 3 } else { 2 };
                assert_eq!(
                    Message::parse(&b, other).unwrap_err().status,
                    ErrorStatus::UnsupportedProtocolVersion
                );
            }
        }
    }

    fn status(b: &[u8]) -> ErrorStatus {
        Message::parse(b, 2).unwrap_err().status
    }

    #[test]
    fn malformed_messages_get_their_status() {
        let good = enc(&Message::ChannelTest(CH));
        // Unknown message type.
        let mut b = good.clone();
        b[2] = 0x99;
        assert_eq!(status(&b), ErrorStatus::UnknownMessageType);
        // message_length disagrees with the bytes.
        let mut b = good.clone();
        b[4] += 1;
        assert_eq!(status(&b), ErrorStatus::InvalidMessage);
        // Wrong length of a fixed parameter (client_id of 3 bytes).
        let b = [2, 0, 0x12, 0, 13, 0, 1, 0, 3, 1, 2, 3, 0, 3, 0, 2, 0, 7];
        assert_eq!(status(&b), ErrorStatus::InconsistentLength);
        // A parameter running past the body.
        let b = [2, 0, 0x12, 0, 8, 0, 1, 0, 9, 1, 2, 3, 4];
        assert_eq!(status(&b), ErrorStatus::InconsistentLength);
        // Unknown parameter, and one of another message (bandwidth in a test).
        let mut b = good.clone();
        b.extend_from_slice(&[0x12, 0x34, 0, 0]);
        b[4] += 4;
        assert_eq!(status(&b), ErrorStatus::UnknownParameterType);
        let mut b = good.clone();
        b.extend_from_slice(&[0, 6, 0, 2, 0, 1]);
        b[4] += 6;
        assert_eq!(status(&b), ErrorStatus::UnknownParameterType);
        // Missing and duplicated parameters.
        let b = [2, 0, 0x12, 0, 8, 0, 1, 0, 4, 1, 2, 3, 4];
        assert_eq!(status(&b), ErrorStatus::MissingParameter);
        let mut b = good.clone();
        b.extend_from_slice(&[0, 3, 0, 2, 0, 8]);
        b[4] += 6;
        assert_eq!(status(&b), ErrorStatus::InvalidMessage);
        // Bad values.
        let mut b = enc(&Message::ChannelSetup {
            channel: CH,
            ts_packets: true,
        });
        *b.last_mut().unwrap() = 2;
        assert_eq!(status(&b), ErrorStatus::InvalidValue);
        // Stray bytes after the last parameter, short header.
        let mut b = good.clone();
        b.push(0);
        b[4] += 1;
        assert_eq!(status(&b), ErrorStatus::InvalidMessage);
        assert_eq!(status(&good[..3]), ErrorStatus::InvalidMessage);
    }

    #[test]
    fn names_and_codes() {
        assert_eq!(error_name(0x000F), "exceeded bandwidth (0x000F)");
        assert_eq!(error_name(0x1234), "0x1234 (not in TS 103 197)");
        for e in ErrorStatus::ALL {
            assert_eq!(ErrorStatus::from_code(e.code()), Some(*e));
        }
        assert_eq!(
            MessageType::StreamBwAllocation.name(),
            "stream_BW_allocation"
        );
        assert_eq!(frame_len(&[2, 0, 0x11, 1, 2]), Some(5 + 258));
        assert_eq!(frame_len(&[2, 0]), None);
        let big = vec![0u8; 70_000];
        let m = Message::DataProvision {
            client_id: 1,
            data_channel_id: None,
            data_stream_id: None,
            data_id: 1,
            datagrams: vec![&big],
        };
        let mut out = vec![9];
        assert_eq!(m.encode(2, &mut out), Err(EncodeError(70_000)));
        assert_eq!(out, [9], "nothing half-written");
    }

    #[cfg(feature = "player")]
    #[tokio::test]
    async fn read_message_bounds_what_it_reads() {
        let mut two = enc(&Message::ChannelTest(CH));
        two.extend(enc(&Message::StreamTest(ST)));
        let mut r = &two[..];
        let mut buf = Vec::new();
        read_message(&mut r, &mut buf, 100).await.unwrap();
        assert_eq!(Message::parse(&buf, 2).unwrap(), Message::ChannelTest(CH));
        read_message(&mut r, &mut buf, 100).await.unwrap();
        assert_eq!(Message::parse(&buf, 2).unwrap(), Message::StreamTest(ST));
        assert!(matches!(
            read_message(&mut r, &mut buf, 100).await,
            Err(ReadError::Closed)
        ));
        // A huge message_length is refused before its body is read.
        let mut r: &[u8] = &[2, 0, 0x12, 0xFF, 0xFF, 1];
        assert!(matches!(
            read_message(&mut r, &mut buf, 100).await,
            Err(ReadError::TooLong {
                message_type: 0x12,
                len: 65535,
                max: 100
            })
        ));
        assert!(buf.capacity() < 1000);
        // Cut inside a body: an I/O error, not a message.
        let mut r: &[u8] = &two[..10];
        assert!(matches!(
            read_message(&mut r, &mut buf, 100).await,
            Err(ReadError::Io(_))
        ));
    }
}
