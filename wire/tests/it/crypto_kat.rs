//! Known-answer tests of the primitives under `casd_wire::crypto`:
//! RFC 4493 AES-CMAC, NIST SP 800-38A F.5.1 CTR-AES128.Encrypt, and
//! NIST SP 800-108 counter-mode KBKDF with CMAC-AES128 (CAVP vectors), plus
//! checks that our label/context KDF, DUK and EMM-key derivations are the
//! SP 800-108 construction computed independently with the `cmac` crate.

use aes::cipher::{KeyIvInit, StreamCipher};
use casd_wire::crypto::*;
use cmac::{Cmac, Mac};

fn h(s: &str) -> Vec<u8> {
    hex::decode(s.replace([' ', '\n'], "")).expect("test hex")
}

fn key(s: &str) -> Key128 {
    Key128::from_slice(&h(s)).expect("16-byte test key")
}

const RFC_KEY: &str = "2b7e151628aed2a6abf7158809cf4f3c";
const SP_MSG: &str = "6bc1bee22e409f96e93d7e117393172a ae2d8a571e03ac9c9eb76fac45af8e51 \
                      30c81c46a35ce411e5fbc1191a0a52ef f69f2445df4f9b17ad2b417be66c3710";

/// RFC 4493 §4 examples 1–4 through the same `cmac` crate configuration
/// (`Cmac<Aes128>`, zeroize feature) that `crypto.rs` uses.
#[test]
fn rfc4493_aes_cmac() {
    let msg = h(SP_MSG);
    for (len, tag) in [
        (0, "bb1d6929e95937287fa37d129b756746"),
        (16, "070a16b46b4d4144f79bdd9dd04a287c"),
        (40, "dfa66747de9ae63030ca32611497c827"),
        (64, "51f0bebf7e3b9d92fc49741779363cfe"),
    ] {
        let mut m = <Cmac<aes::Aes128> as Mac>::new_from_slice(&h(RFC_KEY)).unwrap();
        m.update(&msg[..len]);
        assert_eq!(hex::encode(m.finalize().into_bytes()), tag, "Mlen={len}");
    }
}

/// SP 800-38A F.5.1 CTR-AES128.Encrypt: the counter block is one 128-bit
/// big-endian integer (`Ctr128BE`), as §3.3 requires.
#[test]
fn sp800_38a_f51_ctr_aes128_encrypt() {
    let iv: [u8; 16] = h("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").try_into().unwrap();
    let mut buf = h(SP_MSG);
    let mut c = ctr::Ctr128BE::<aes::Aes128>::new(h(RFC_KEY).as_slice().into(), &iv.into());
    c.apply_keystream(&mut buf);
    assert_eq!(
        hex::encode(&buf),
        "874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff\
         5ae4df3edbd5d35e5b4f09020db03eab1e031dda2fbe03d1792170a0f3009cee"
    );
}

/// The counter wraps as one 128-bit integer (not 64-bit halves): the block
/// after ff..ff is 00..00, after 00..00ffffffffffffffff is 00..0100..00.
#[test]
fn ctr_counter_is_full_128_bit_big_endian() {
    let k = h(RFC_KEY);
    let ecb = |block: [u8; 16]| {
        use aes::cipher::{BlockEncrypt, KeyInit};
        let aes = aes::Aes128::new(k.as_slice().into());
        let mut b = block.into();
        aes.encrypt_block(&mut b);
        <[u8; 16]>::from(b)
    };
    let mut iv = [0u8; 16];
    iv[8..].copy_from_slice(&[0xff; 8]);
    let mut next = [0u8; 16];
    next[7] = 1;
    let mut buf = [0u8; 32];
    ctr::Ctr128BE::<aes::Aes128>::new(k.as_slice().into(), &iv.into()).apply_keystream(&mut buf);
    assert_eq!(buf[..16], ecb(iv));
    assert_eq!(buf[16..], ecb(next));
}

/// NIST CAVP KBKDF (SP 800-108), CounterMode, [PRF=CMAC_AES128]
/// [CTRLOCATION=BEFORE_FIXED] [RLEN=32_BITS], L = 128, COUNT=0 (the vector
/// also used by BouncyCastle's and corecrypto's KATs).
#[test]
fn sp800_108_cavp_cmac_aes128_l128() {
    let mut out = [0u8; 16];
    kdf_ctr_cmac_fixed(
        &key("c10b152e8c97b77e18704e0f0bd38305"),
        &h(
            "98cd4cbbbebe15d17dc86e6dbad800a2dcbd64f7c7ad0e78e9cf94ffdba89d03\
            e97eadf6c4f7b806caf52aa38f09d0eb71d71f497bcc6906b48d36c4",
        ),
        &mut out,
    )
    .unwrap();
    assert_eq!(hex::encode(out), "26faf61908ad9ee881b8305c221db53f");
}

/// Same CAVP section, an L = 256 vector (two PRF blocks, counter 1 and 2),
/// as quoted by a third-party KAT suite.
#[test]
fn sp800_108_cavp_cmac_aes128_l256() {
    let mut out = [0u8; 32];
    kdf_ctr_cmac_fixed(
        &key("695f1b1a16c949cea51cdf2554ec9d42"),
        &h(
            "4fce5942832a390aa1cbe8a0bf9d202cb799e986c9d6b51f45e4d597a6b57f06\
            a4ebfec6467335d116b7f5f9c5b954062f661820f5db2a5bbb3e0625",
        ),
        &mut out,
    )
    .unwrap();
    assert_eq!(
        hex::encode(out),
        "d34b601ec18c34dfa0f9e0b7523e218bdddb9befe8d08b6c0202d75ace0dba89"
    );
}

/// Independent computation of `K(i) = CMAC(key, u32(i) || label || 0x00 ||
/// context || u32(L))` with the `cmac` crate, byte string assembled by hand.
fn reference_kdf(k: &[u8], label: &[u8], context: &[u8], l_bits: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 1u32;
    while out.len() * 8 < l_bits as usize {
        let mut input = Vec::new();
        input.extend_from_slice(&i.to_be_bytes());
        input.extend_from_slice(label);
        input.push(0);
        input.extend_from_slice(context);
        input.extend_from_slice(&l_bits.to_be_bytes());
        let mut m = <Cmac<aes::Aes128> as Mac>::new_from_slice(k).unwrap();
        m.update(&input);
        out.extend_from_slice(&m.finalize().into_bytes());
        i += 1;
    }
    out.truncate(l_bits as usize / 8);
    out
}

#[test]
fn label_context_kdf_matches_reference_and_fixed_form() {
    let k = key("000102030405060708090a0b0c0d0e0f");
    for len in [1usize, 16, 17, 32, 48] {
        let mut ours = vec![0u8; len];
        kdf_ctr_cmac(&k, b"label", b"ctx", &mut ours).unwrap();
        assert_eq!(
            ours,
            reference_kdf(k.expose(), b"label", b"ctx", len as u32 * 8)
        );
        let mut fixed = b"label\0ctx".to_vec();
        fixed.extend_from_slice(&(len as u32 * 8).to_be_bytes());
        let mut via_fixed = vec![0u8; len];
        kdf_ctr_cmac_fixed(&k, &fixed, &mut via_fixed).unwrap();
        assert_eq!(ours, via_fixed);
    }
}

#[test]
fn duk_and_emm_keys_match_reference() {
    let pmk = key("00112233445566778899aabbccddeeff");
    let device_id: u64 = 0x0012_3456_789A;
    let duk = derive_duk(&pmk, device_id);
    assert_eq!(
        duk.expose().to_vec(),
        reference_kdf(pmk.expose(), b"CAS-DUK", &device_id.to_be_bytes(), 128)
    );
    let mut context = vec![0x82];
    context.extend_from_slice(&device_id.to_be_bytes());
    let okm = reference_kdf(duk.expose(), b"CAS-EMM-KEK", &context, 256);
    let (k_wrap, k_mac) = derive_emm_keys(&duk, 0x82, &device_id.to_be_bytes());
    assert_eq!(k_wrap.expose()[..], okm[..16]);
    assert_eq!(k_mac.expose()[..], okm[16..]);
    // Global: context is table_id alone.
    let glk = key("ffeeddccbbaa99887766554433221100");
    let okm = reference_kdf(glk.expose(), b"CAS-EMM-KEK", &[0x84], 256);
    let (k_wrap, k_mac) = derive_emm_keys(&glk, 0x84, &[]);
    assert_eq!(k_wrap.expose()[..], okm[..16]);
    assert_eq!(k_mac.expose()[..], okm[16..]);
}

/// A section built by hand from the spec text with the raw primitives equals
/// `SectionKeys::seal_deterministic`.
#[test]
fn section_matches_hand_built_from_spec() {
    use aes::cipher::{BlockEncrypt, KeyInit};
    let root = key("0f0e0d0c0b0a09080706050403020100");
    let address = 7u64.to_be_bytes();
    let iv: [u8; 16] = h("000102030405060708090a0b0c0d0e0f").try_into().unwrap();
    let dek = key("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf");
    let plaintext = b"thirty bytes of plaintext.....";
    let sealed = SectionKeys::derive(&root, 0x82, &address)
        .unwrap()
        .seal_deterministic(0xBEEF, 5, plaintext, 256, &iv, &dek)
        .unwrap();

    let (k_wrap, k_mac) = derive_emm_keys(&root, 0x82, &address);
    let total = 8 + 8 + 37 + plaintext.len() + 16 + 4;
    let sl = (total - 3) as u16;
    let mut s = vec![
        0x82,
        0xF0 | (sl >> 8) as u8,
        sl as u8,
        0xBE,
        0xEF,
        0xC1,
        0,
        0,
    ];
    s.extend_from_slice(&address);
    s.push(1);
    s.extend_from_slice(&5u32.to_be_bytes());
    s.extend_from_slice(&iv);
    let mut w = (*dek.expose()).into();
    aes::Aes128::new(k_wrap.expose().into()).encrypt_block(&mut w);
    s.extend_from_slice(&w);
    let mut ct = plaintext.to_vec();
    ctr::Ctr128BE::<aes::Aes128>::new(dek.expose().into(), &iv.into()).apply_keystream(&mut ct);
    s.extend_from_slice(&ct);
    let mut m = <Cmac<aes::Aes128> as Mac>::new_from_slice(k_mac.expose()).unwrap();
    m.update(&s);
    s.extend_from_slice(&m.finalize().into_bytes());
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_MPEG_2).checksum(&s);
    s.extend_from_slice(&crc.to_be_bytes());
    assert_eq!(hex::encode(&sealed), hex::encode(&s));
    let opened = open_section(&root, &sealed).unwrap();
    assert_eq!(&opened.plaintext[..], plaintext);
}

/// Long labels/contexts take the streaming path of the KDF; both paths agree
/// with the reference.
#[test]
fn kdf_long_fixed_input_matches_reference() {
    let k = key("000102030405060708090a0b0c0d0e0f");
    let label = vec![b'L'; 70];
    let context = vec![0xC5; 50];
    let mut ours = [0u8; 32];
    kdf_ctr_cmac(&k, &label, &context, &mut ours).unwrap();
    assert_eq!(
        ours.to_vec(),
        reference_kdf(k.expose(), &label, &context, 256)
    );
}
