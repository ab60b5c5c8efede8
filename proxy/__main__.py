from toolmend.server.cli import main

main()
