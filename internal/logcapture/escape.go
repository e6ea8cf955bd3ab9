package logcapture

import "unicode/utf8"

// appendEscaped appends text to b with every byte that a terminal could
// take as a command written as a Go escape instead, so that a module's line
// on the parent's stderr can neither move the cursor, nor end the line, nor
// change the terminal's state: a line can never rewrite or forge another
// module's. Escaped are the C0 controls but tab (as \a \b \f \n \r \v or
// \xHH), DEL (\x7f), the C1 controls U+0080 to U+009F (\u0080), and each
// byte of invalid UTF-8 (\xHH). Everything else, backslashes included, is
// copied as is, so that ordinary lines read as the module wrote them.
func appendEscaped(b []byte, text []byte) []byte {
	for i := 0; i < len(text); {
		c := text[i]
		if c >= 0x20 && c < 0x7f || c == '\t' {
			b = append(b, c)
			i++
			continue
		}
		if c < utf8.RuneSelf {
			b = appendByteEscape(b, c)
			i++
			continue
		}
		r, size := utf8.DecodeRune(text[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = appendByteEscape(b, c)
		case r <= 0x9f:
			b = append(b, '\\', 'u', '0', '0', hex[r>>4], hex[r&0xf])
		default:
			b = append(b, text[i:i+size]...)
		}
		i += size
	}
	return b
}

const hex = "0123456789abcdef"

// appendByteEscape appends the escape of the control or invalid byte c.
func appendByteEscape(b []byte, c byte) []byte {
	switch c {
	case '\a':
		return append(b, `\a`...)
	case '\b':
		return append(b, `\b`...)
	case '\f':
		return append(b, `\f`...)
	case '\n':
		return append(b, `\n`...)
	case '\r':
		return append(b, `\r`...)
	case '\v':
		return append(b, `\v`...)
	}
	return append(b, '\\', 'x', hex[c>>4], hex[c&0xf])
}
