package health

import "github.com/blacksky-md/blacksky/shared/logging"

// MaskJID is logging.MaskJID: /status and the pair page mask JIDs as the
// logs do.
func MaskJID(jid string) string { return logging.MaskJID(jid) }
